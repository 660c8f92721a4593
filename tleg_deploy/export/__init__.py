"""Export verbs: ONNX (``onnx``), validation against PyTorch (``validate``), INT8 / FP16 variants
(``quantize``) and TensorRT engines and scripts (``tensorrt``). Import the submodules directly;
this package imports nothing heavy."""
