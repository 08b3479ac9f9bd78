"""Export a trained net for deployment (ONNX, TorchScript, torch.export, safetensors, TF checkpoint,
TFLite), each file proven to compute what the trained model computes before it is written."""

from .run import FORMATS, ExportResult, check_format, export

__all__ = ["FORMATS", "ExportResult", "check_format", "export"]
