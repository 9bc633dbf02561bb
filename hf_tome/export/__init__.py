"""Export of merged models (ONNX in Optimum's layout, ``torch.export``): ``hf-tome export onnx``."""
