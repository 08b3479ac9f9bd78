"""slim's preprocessing_factory as pure torch functions on uint8 CHW images.

    fn = get_preprocessing("inception_v3", is_training=False)
    x = fn(image_uint8_chw, 299, 299)        # float32 (3, 299, 299) in [-1, 1]

Eval paths reproduce TensorFlow's numbers (TF1 bilinear resize, slim's crop rules); train paths
draw from torch's global RNG (or ``generator=``) with slim's ranges; ``fn.plan`` draws them from
the image size alone, so a loader can decode only the resolution the crop needs. ``ops`` holds the
TF-compatible primitives (resize, crops, colour ops, sample_distorted_bounding_box).
"""

from .factory import (PREPROCESSING_MODULES, SLIM_MODEL_PREPROCESSING, PreprocessingFn, TrainPlan,
                      get_preprocessing, list_preprocessing, resolve_preprocessing_name)
from .ops import (CropBox, adjust_brightness, adjust_contrast, adjust_hue, adjust_saturation,
                  aspect_preserving_resize, aspect_preserving_size, central_crop, central_crop_box,
                  crop_or_pad, flip_left_right, per_image_standardization, resize_bilinear_tf1,
                  resize_bilinear_tf1_window, resize_tf1, rgb_to_grayscale, sample_distorted_bounding_box)

__all__ = [
    "PREPROCESSING_MODULES", "SLIM_MODEL_PREPROCESSING", "PreprocessingFn", "TrainPlan", "get_preprocessing",
    "list_preprocessing", "resolve_preprocessing_name",
    "CropBox", "adjust_brightness", "adjust_contrast", "adjust_hue", "adjust_saturation",
    "aspect_preserving_resize", "aspect_preserving_size", "central_crop", "central_crop_box",
    "crop_or_pad", "flip_left_right", "per_image_standardization", "resize_bilinear_tf1",
    "resize_bilinear_tf1_window", "resize_tf1", "rgb_to_grayscale", "sample_distorted_bounding_box",
]
