"""mmfuse-plan: counts equal the built models', FLOPs and memory follow the documented
formulas, and the 7B recipe plans from its config alone."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from mmfuse.freezing import parameter_table
from mmfuse.model_dir import build_processor_and_model
from mmfuse.plan import compose_plan, main, make_plan, max_micro_batch, memory_per_gpu

REPO = Path(__file__).resolve().parent.parent


@pytest.mark.parametrize(
    "overrides",
    [["model=tiny"], ["model=small"], ["model=tiny", "freeze=alignment"]],
    ids=["tiny", "small", "tiny-alignment"],
)
def test_parameter_counts_equal_the_instantiated_model(overrides: list[str]) -> None:
    cfg = compose_plan(overrides)
    plan = make_plan(cfg)
    _, model = build_processor_and_model(cfg)
    if "freeze=alignment" in overrides:
        from mmfuse.freezing import apply_freezing
        from mmfuse.plan import _plain

        apply_freezing(model, _plain(cfg.freeze))
    assert plan.params == parameter_table(model)


def test_flops_and_memory_follow_the_formulas() -> None:
    cfg = compose_plan(["model=tiny", "num_gpus=4"])
    plan = make_plan(cfg)
    decoder = next(p for p in plan.components if p.name == "decoder")
    length = plan.text_tokens + plan.memory_tokens
    assert decoder.tokens == length == 256 + 8
    assert decoder.flops == 6 * decoder.matmul_params * length + 12 * 2 * length**2 * 32
    assert plan.flops_per_sample == sum(p.flops for p in plan.components)
    total = next(r.total for r in plan.params if r.component == "total")
    ddp = memory_per_gpu(plan, "ddp", 4)
    assert ddp["weights"] + ddp["gradients"] + ddp["optimizer"] == 16 * total
    fsdp = memory_per_gpu(plan, "fsdp", 4)
    assert fsdp["optimizer"] == 8 * total / 4
    zero3 = memory_per_gpu(plan, "deepspeed_zero3", 4)
    assert zero3["optimizer"] == 12 * total / 4 and zero3["gradients"] == 2 * total / 4
    assert fsdp["activations_per_sample"] < ddp["activations_per_sample"], "recomputation"
    static = sum(v for k, v in ddp.items() if k != "activations_per_sample")
    fits = max_micro_batch(ddp, 1.0, 0.5)
    assert fits == int((0.5e9 - static) // ddp["activations_per_sample"])


def test_frozen_encoders_need_no_backward() -> None:
    plan = make_plan(compose_plan(["model=tiny", "freeze=encoders"]))
    image = next(p for p in plan.components if p.name == "encoders.image")
    assert not image.trains and image.head_params > 0
    expected = 2 * image.matmul_params * image.tokens + image.attention_flops / 3
    assert image.flops == pytest.approx(expected + 6 * image.head_params * image.tokens)


def test_7b_recipe(capsys: pytest.CaptureFixture) -> None:
    main(["experiment=plan_7b", "flops_per_second=3.2e15"])
    out = capsys.readouterr().out
    decoder = next(line for line in out.splitlines() if line.strip().startswith("decoder "))
    assert decoder.split() == ["decoder", "6,738,415,616", "6,738,415,616"], "LLaMA-7B"
    assert "tokens D = 20 x N = 134.77B" in out
    for strategy in ("ddp", "fsdp", "deepspeed_zero2", "deepspeed_zero3"):
        assert f"\n  {strategy} " in out
    assert "Time at 3.200e+15 FLOP/s" in out and "days" in out
    ddp = next(line for line in out.splitlines() if line.strip().startswith("ddp "))
    assert ddp.split()[-3:] == ["0", "0", "0"], "7B with Adam does not fit one GPU under DDP"


def test_console_script() -> None:
    result = subprocess.run(
        [str(REPO / ".venv" / "bin" / "mmfuse-plan"), "model=tiny"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert "Chinchilla compute-optimal" in result.stdout
