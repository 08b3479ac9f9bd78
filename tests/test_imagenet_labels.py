"""slim's ImageNet class names ship with the package; predict names a published checkpoint's classes."""

import torch
from PIL import Image
from skimage import data as skimage_data
from torchvision.models._meta import _IMAGENET_CATEGORIES

import slimtune
from slimtune.checkpoint import write_tf_checkpoint
from slimtune.checkpoint.names import torch_to_slim, torch_to_tf_array
from slimtune.data.imagenet import imagenet_class_names
from slimtune.predict import predict

# torchvision renamed two of the duplicated ImageNet names; every other first synonym is the same.
TORCHVISION_RENAMES = {134: ("crane bird", "crane"), 639: ("maillot tank suit", "maillot, tank suit")}


def test_names_follow_slims_label_order_checked_against_torchvision():
    names_1000, names_1001 = imagenet_class_names(1000), imagenet_class_names(1001)
    assert len(names_1000) == 1000 and names_1001 == ["background"] + names_1000
    for index, (theirs, ours) in enumerate(zip(_IMAGENET_CATEGORIES, names_1000)):
        if index in TORCHVISION_RENAMES:
            assert (theirs, ours) == TORCHVISION_RENAMES[index]
        else:
            assert ours.split(",")[0].strip().lower() == theirs.lower(), index
    assert names_1001[282] == names_1000[281] == "tabby, tabby cat"  # slim's label = torchvision's + 1
    assert imagenet_class_names(10) is None


def test_predict_with_a_published_style_checkpoint_prints_imagenet_names(tmp_path):
    torch.manual_seed(0)
    model = slimtune.create_model("mobilenet_v1_025", num_classes=1001).eval()
    weights = {torch_to_slim(k): torch_to_tf_array(k, v.numpy()) for k, v in model.state_dict().items()
               if not k.endswith("num_batches_tracked")}
    prefix = write_tf_checkpoint(tmp_path / "mobilenet_v1_0.25_224.ckpt", weights, version=2)
    image = tmp_path / "chelsea.png"
    Image.fromarray(skimage_data.chelsea()).save(image)
    [prediction] = predict(str(prefix), [str(image)], model_name="mobilenet_v1_025", top_k=3, device="cpu")
    names = imagenet_class_names(1001)
    assert len(prediction.labels) == 3
    for label in prediction.labels:
        assert label["name"] == names[label["index"]]
    assert not any(label["name"].isdigit() for label in prediction.labels)
