"""python embed.py ckpt_path=... [split=test | input=...] [query=...]: features and nearest neighbours."""

from skuvision.cli import embed

if __name__ == "__main__":
    embed()
