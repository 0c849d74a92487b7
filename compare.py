"""python compare.py sweep_dir=multirun/...: a multirun's leaderboard (.md, .csv, .png in that folder)."""

from skuvision.cli import compare

if __name__ == "__main__":
    compare()
