"""python export.py ckpt_path=...: ONNX with a dynamic batch, checked against PyTorch with onnxruntime."""

from skuvision.cli import export

if __name__ == "__main__":
    export()
