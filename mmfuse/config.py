"""Where the Hydra configs live (``conf/`` at the repository root)."""

from pathlib import Path

CONFIG_DIR = str(Path(__file__).resolve().parent.parent / "conf")
