"""Image quality (dark, light, blurry, low information, odd size or aspect ratio, grayscale) and exact
duplicates, by cleanvision's Imagelab over every split at once."""

from __future__ import annotations

import logging

import numpy as np
import pandas as pd
from cleanvision import Imagelab
from torchvision.transforms.v2.functional import to_pil_image

from skuvision.audit.catalogue import Catalogue
from skuvision.compat import progress_bars_only_on_a_terminal

log = logging.getLogger("skuvision")

EXACT = "exact_duplicates"


class PILImages:
    """In-memory uint8 CHW images as the (PIL image, label) items Imagelab's torchvision_dataset reads."""

    def __init__(self, datamodule, catalogue: Catalogue):
        self.datasets = datamodule.splits
        self.catalogue = catalogue

    def __len__(self) -> int:
        return len(self.catalogue)

    def __getitem__(self, i: int):
        split, index = self.catalogue.splits[i], int(self.catalogue.index[i])
        image, label = self.datasets[split][index]
        return to_pil_image(image), label


def meaningful_checks(checks: list[str], catalogue: Catalogue, in_chans: int) -> tuple[list[str], dict]:
    """The checks that can mean something for this source, and why the others were skipped."""
    skipped = {}
    if not catalogue.file_backed:
        for check in ("odd_size", "odd_aspect_ratio"):
            skipped[check] = "in-memory images all have one size"
    if in_chans == 1:
        skipped["grayscale"] = "the source has one channel: every image is grayscale"
    return [c for c in checks if c not in skipped], {c: r for c, r in skipped.items() if c in checks}


def run_imagelab(datamodule, catalogue: Catalogue, checks: list[str], n_jobs: int) -> pd.DataFrame:
    """cleanvision's issues table, one row per catalogue image in catalogue order (scores and is_*_issue
    columns), and its exact-duplicate sets as catalogue indices in the frame's `attrs["exact_sets"]`."""
    issue_types = {check: {} for check in [*checks, EXACT]}
    progress_bars_only_on_a_terminal()
    if catalogue.file_backed:
        paths = list(dict.fromkeys(catalogue.items))  # Imagelab refuses a path listed twice
        lab = Imagelab(filepaths=paths, verbose=False)
        lab.find_issues(issue_types, n_jobs=n_jobs, verbose=False)
        position = {p: i for i, p in enumerate(catalogue.items)}
        issues = lab.issues.loc[catalogue.items].reset_index(drop=True)
        sets = [[position[p] for p in group] for group in lab.info[EXACT]["sets"]]
    else:
        lab = Imagelab(torchvision_dataset=PILImages(datamodule, catalogue), verbose=False)
        lab.find_issues(issue_types, verbose=False)
        issues = lab.issues.reset_index(drop=True)
        sets = [[int(i) for i in group] for group in lab.info[EXACT]["sets"]]
    issues.attrs["exact_sets"] = [sorted(group) for group in sets]
    issues.attrs["checks"] = checks
    return issues


def flagged(issues: pd.DataFrame) -> pd.Series:
    """Per image, the checks it fails, joined by ';' ('' when none)."""
    checks = issues.attrs["checks"]
    columns = issues[[f"is_{c}_issue" for c in checks]].to_numpy(dtype=bool)
    names = np.array(checks)
    return pd.Series([";".join(names[row]) for row in columns], index=issues.index)
