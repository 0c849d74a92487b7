"""Marks conf/ as the package skuvision.conf (src/skuvision/conf links here): Hydra reads pkg:// config
sources only from packages, and the wheel ships these YAMLs inside skuvision."""
