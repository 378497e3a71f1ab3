"""Multi-stage training: ``mmfuse-recipe recipe=two_stage [overrides]``.

A recipe (``conf/recipe/<name>.yaml``) lists stages in order; each is an ``mmfuse-train``
run of the train config with the stage's overrides (usually ``experiment=<name>``), in
``<output_dir>/<stage>/``. A stage with ``init_from: <earlier stage>`` starts from that
stage's model directory (``init_from=<output_dir>/<earlier stage>/model``)::

    stages:
      stage1: {overrides: [experiment=stage1_align]}
      stage2: {overrides: [experiment=stage2_instruct], init_from: stage1}

Command-line arguments: ``recipe=<name or YAML path>`` (default ``two_stage``),
``output_dir=<dir>`` (default ``runs/recipes/<recipe>/<time>``), ``<stage>.<override>`` for
one stage (``stage1.trainer.max_steps=500``, ``stage2.lora=decoder``,
``+stage1.trainer.limit_val_batches=0``) and any other Hydra override for every stage. Every
stage's config is composed before the first one starts, so a bad override fails at once. A
stage whose ``model/`` directory already exists is skipped: the same command with the same
``output_dir`` continues a recipe that stopped part-way.
"""

from __future__ import annotations

import logging
import re
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

from hydra import compose, initialize_config_dir
from omegaconf import DictConfig, OmegaConf

from mmfuse.allocator import keep_freed_memory
from mmfuse.config import CONFIG_DIR
from mmfuse.train import train

log = logging.getLogger(__name__)

RECIPE_DIR = Path(CONFIG_DIR) / "recipe"
_STAGE_OVERRIDE = re.compile(r"^([+~]*)([A-Za-z_][A-Za-z0-9_]*)\.(.+=.*)$")


@dataclass
class Stage:
    """One stage of a recipe.

    Attributes:
        name: its name (and subdirectory).
        overrides: train-config overrides, the recipe's and then the command line's.
        init_from: the earlier stage whose model directory it starts from, or None.
    """

    name: str
    overrides: list[str] = field(default_factory=list)
    init_from: str | None = None


def load_recipe(name_or_path: str) -> list[Stage]:
    """The stages of ``conf/recipe/<name>.yaml`` (or of a YAML file), in order.

    Raises:
        ValueError: an unknown recipe, a bad key, or ``init_from`` naming no earlier stage.
    """
    path = Path(name_or_path)
    if path.suffix not in (".yaml", ".yml"):
        path = RECIPE_DIR / f"{name_or_path}.yaml"
    if not path.is_file():
        known = ", ".join(sorted(p.stem for p in RECIPE_DIR.glob("*.yaml")))
        raise ValueError(f"recipe={name_or_path}: no such recipe (built in: {known})")
    spec = OmegaConf.to_container(OmegaConf.load(path), resolve=True)
    stages: list[Stage] = []
    for name, body in (spec.get("stages") or {}).items():
        body = body or {}
        unknown = set(body) - {"overrides", "init_from"}
        if unknown:
            raise ValueError(f"recipe {path}: stage {name}: unknown keys {sorted(unknown)}")
        init_from = body.get("init_from")
        if init_from is not None and init_from not in [s.name for s in stages]:
            raise ValueError(
                f"recipe {path}: stage {name}: init_from={init_from} is no earlier stage"
            )
        stages.append(Stage(str(name), [str(o) for o in body.get("overrides") or []], init_from))
    if not stages:
        raise ValueError(f"recipe {path}: no stages")
    return stages


def split_arguments(
    args: Sequence[str], stage_names: Sequence[str]
) -> tuple[dict[str, str], list[str], dict[str, list[str]]]:
    """Splits command-line arguments into the driver's own (``recipe``, ``output_dir``),
    overrides for every stage and overrides per stage (``<stage>.<override>``)."""
    own: dict[str, str] = {}
    common: list[str] = []
    per_stage: dict[str, list[str]] = {name: [] for name in stage_names}
    for arg in args:
        key = arg.split("=", 1)[0]
        if key in ("recipe", "output_dir") and "=" in arg:
            own[key] = arg.split("=", 1)[1]
            continue
        match = _STAGE_OVERRIDE.match(arg)
        if match and match.group(2) in per_stage:
            per_stage[match.group(2)].append(match.group(1) + match.group(3))
        else:
            common.append(arg)
    return own, common, per_stage


def stage_configs(
    stages: Sequence[Stage], output_dir: Path, common: Sequence[str], per_stage: dict
) -> list[DictConfig]:
    """The train config of every stage, composed from ``conf/train.yaml``."""
    configs = []
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        for stage in stages:
            overrides = [*stage.overrides, *common, *per_stage.get(stage.name, [])]
            overrides.append(f"paths.output_dir={output_dir / stage.name}")
            if stage.init_from:
                overrides.append(f"init_from={output_dir / stage.init_from / 'model'}")
            configs.append(compose("train", overrides=overrides))
    return configs


def run_recipe(
    recipe: str, output_dir: str | Path, overrides: Sequence[str] = ()
) -> dict[str, Path]:
    """Runs the stages of ``recipe`` in turn in ``output_dir/<stage>``.

    Args:
        recipe: a recipe name (``conf/recipe/``) or YAML path.
        output_dir: the recipe's directory.
        overrides: train-config overrides; ``<stage>.<override>`` for one stage only.

    Returns:
        ``{stage: its model directory}``.
    """
    stages = load_recipe(recipe)
    own, common, per_stage = split_arguments(overrides, [s.name for s in stages])
    if own:
        raise ValueError(f"{sorted(own)}: arguments of mmfuse-recipe, not overrides")
    output_dir = Path(output_dir)
    configs = stage_configs(stages, output_dir, common, per_stage)
    output_dir.mkdir(parents=True, exist_ok=True)
    OmegaConf.save(
        {"recipe": recipe, "overrides": list(overrides), "stages": [s.__dict__ for s in stages]},
        output_dir / "recipe.yaml",
    )
    models = {}
    for stage, cfg in zip(stages, configs, strict=True):
        model_dir = output_dir / stage.name / "model"
        if (model_dir / "model.safetensors").is_file():
            log.info(
                "recipe %s: stage %s done already (%s); skipped", recipe, stage.name, model_dir
            )
        else:
            log.info("recipe %s: stage %s in %s", recipe, stage.name, model_dir.parent)
            train(cfg)
        models[stage.name] = model_dir
    return models


def main(argv: Sequence[str] | None = None) -> None:
    """``mmfuse-recipe [recipe=<name>] [output_dir=<dir>] [overrides]``."""
    logging.basicConfig(level=logging.INFO, format="[%(asctime)s][%(name)s] %(message)s")
    keep_freed_memory()
    args = list(sys.argv[1:] if argv is None else argv)
    if any(a in ("-h", "--help") for a in args):
        print(__doc__)
        return
    recipe = next((a.split("=", 1)[1] for a in args if a.startswith("recipe=")), "two_stage")
    output_dir = next((a.split("=", 1)[1] for a in args if a.startswith("output_dir=")), None)
    if output_dir is None:
        output_dir = f"runs/recipes/{Path(recipe).stem}/{datetime.now():%Y-%m-%d_%H-%M-%S}"
    rest = [a for a in args if not a.startswith(("recipe=", "output_dir="))]
    models = run_recipe(recipe, output_dir, rest)
    for stage, model_dir in models.items():
        print(f"{stage}: {model_dir}")


if __name__ == "__main__":
    main()
