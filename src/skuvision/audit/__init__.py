"""The catalogue audit's parts: embeddings of every split, label issues, duplicates, image quality, report."""
