"""python serve.py ckpt_path=... [index=<embed run>] [serve.port=8000]: the HTTP API and the demo page."""

from skuvision.cli import serve

# LitServe starts its workers as new processes, which import this file again: they must not start a server.
if __name__ == "__main__":
    serve()
