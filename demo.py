"""python demo.py ckpt_path=... [index=<embed run>]: the demo page alone (Gradio, model in this process)."""

from skuvision.cli import demo

if __name__ == "__main__":
    demo()
