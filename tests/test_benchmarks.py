"""Smoke tests of the benchmark helpers (benchmarks/) on the tiny model and world: what they
compute and compare, never how fast (no timing assertions)."""

from __future__ import annotations

import argparse
import json
import math
import os

import psutil
import pytest
import torch
from conftest import tiny_train_overrides

from benchmarks import (
    allocator,
    audio_frontend,
    batcher_load,
    compute,
    data_pipeline,
    feature_cache,
    generation,
    memory,
    onednn_linear,
    optimisations,
    overhead,
    row_groups,
    sample_cache,
    serve_load,
    shared_prefill,
)
from benchmarks.common import Report, build_model, compose_train, train_batches
from benchmarks.run import add_feature_cache
from benchmarks.run import main as bench_main
from benchmarks.scaling import measure_scaling, plot

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def setup(world_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("bench")
    cfg = compose_train(tiny_train_overrides(world_dir, out), out)
    processor, model = build_model(cfg)
    batches = train_batches(cfg, processor, 4)
    return cfg, processor, model, batches


def test_lightning_and_plain_loops_give_equal_losses(setup):
    cfg, _, model, batches = setup
    before = {k: v.clone() for k, v in model.state_dict().items()}
    result = overhead.measure_overhead(cfg, model, batches, warmup=1, repeats=2)
    assert result.max_abs_loss_diff == 0.0
    assert len(result.losses) == len(batches)
    assert all(math.isfinite(x) for x in result.losses)
    assert result.lightning_s > 0 and result.plain_s > 0 and len(result.ratios) == 2
    # the model is left as it was
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_separate_runs_repeat_the_lockstep_losses(setup):
    cfg, _, model, batches = setup
    state = {k: v.clone() for k, v in model.state_dict().items()}
    plain = overhead.run_plain(cfg, model, batches)
    model.load_state_dict(state)
    lightning = overhead.run_lightning(cfg, model, batches)
    model.load_state_dict(state)
    assert plain.losses == lightning.losses
    assert len(plain.durations()) == len(batches)


def test_host_sync_counter_counts_host_reads():
    with overhead.HostSyncCounter() as counter:
        x = torch.tensor([1.0, 2.0])
        bool(x.sum() > 0)
        x.sum().item()
        float(x[0])
        x.tolist()
        x + 1  # no read
    assert sum(counter.calls.values()) == 4
    assert all("test_benchmarks.py" in place for place in counter.calls)


def test_host_syncs_of_a_lightning_step_are_counted(setup):
    cfg, _, model, batches = setup
    per_step, calls, _ = overhead.count_host_syncs(cfg, model, batches)
    assert per_step > 0
    # mmfuse's own code reads the device once per step: the non-finite guard's combined
    # loss check and gradient norm (the encoders, the loss and the logging read nothing)
    ours = {place: n for place, n in calls.items() if " at mmfuse/" in place}
    assert len(ours) == 1, ours
    ((place, count),) = ours.items()
    assert place.startswith("tolist at mmfuse/nonfinite.py") and "on_before_optimizer_step" in place
    assert count == len(batches) - 1  # one per counted step (the first is skipped)


def test_generation_runs_to_the_token_count_and_variants_agree(setup, world_dir):
    _, processor, model, _ = setup
    batch = generation.prompt_batch(processor, world_dir / "test.jsonl", 3)
    tokenizer = model.tokenizer
    result = generation.measure_generation(model, batch, 12, warmup=0, repeats=1)
    assert model.tokenizer is tokenizer  # the stand-in is gone
    assert result.tokens_per_row == 12
    assert result.agreement == 1.0
    assert result.cached_s > 0 and result.uncached_s > 0 and result.hf_s > 0


def test_agreement_counts_tokens_before_the_first_difference():
    same = [[1, 2, 3], [4, 5, 6]]
    assert generation.agreement([same, same]) == 1.0
    assert generation.agreement([[[1, 2, 3]], [[1, 9, 3]]]) == pytest.approx(1 / 3)


def test_loader_throughput_counts_samples(setup):
    cfg, processor, _, _ = setup
    result = data_pipeline.loader_throughput(cfg, processor, batches=2, repeats=2, warmup=1)
    assert result.batch_size == 8 and result.num_workers == 0
    assert len(result.rates) == 2 and result.samples_per_s > 0


def test_training_step_flops_are_counted(setup):
    _, _, model, batches = setup
    total, parts = compute.training_step_flops(model, batches[0])
    assert total > 0
    assert {"decoder", "fusion"} <= set(parts)
    assert sum(parts.values()) < total  # forward only: a third or so of the step
    assert all(p.grad is None for p in model.parameters())
    assert compute.peak_fraction(2e9, 0.5, 8e9) == pytest.approx(0.5)


def test_gradient_checkpointing_keeps_the_losses(setup, tmp_path):
    cfg, _, _, batches = setup
    path = memory.save_batches(batches[:2], tmp_path / "batches.pt")
    overrides = ["model=tiny"]
    plain = memory.child(overrides, False, str(path))
    ckpt = memory.child(overrides, True, str(path))
    assert plain["losses"] == ckpt["losses"]
    assert plain["peak_bytes"] >= plain["baseline_bytes"] > 0


def test_memory_child_process_reports_its_peak(setup, tmp_path):
    _, _, _, batches = setup
    path = memory.save_batches(batches[:1], tmp_path / "batches.pt")
    result = memory.measure_memory(["model=tiny"], False, path, threads=1)
    assert result.peak_mb > result.step_mb >= 0
    assert len(result.losses) == 1


def test_scaling_measures_each_size_and_plots(setup, tmp_path):
    _, processor, model, _ = setup
    state = {k: v.clone() for k, v in model.state_dict().items()}
    result = measure_scaling(
        model,
        image_size=processor.image.size,
        sample_rate=processor.audio.sample_rate,
        batch_size=2,
        text_lengths=[8, 16],
        audio_seconds=[0.5, 1.0],
        fixed_text=8,
        fixed_audio_s=0.5,
        warmup=0,
        repeats=1,
    )
    assert result.text_tokens == [8, 16]
    assert len(result.text_step_s) == 2 and len(result.media_step_s) == 2
    assert result.media_tokens[0] < result.media_tokens[1]  # longer clips, more frames
    assert all(torch.equal(state[k], v) for k, v in model.state_dict().items())
    png = plot(result, tmp_path / "scaling.png")
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        assert png is None
    else:
        assert png is not None and png.stat().st_size > 0


def test_attention_kernels_are_found(setup):
    _, _, model, _ = setup
    kernels = optimisations.attention_kernels(model)
    assert kernels["decoder"] == "sdpa"
    assert any(name.startswith("fusion.") for name in kernels)


def test_optimizer_variants_train_alike(setup):
    cfg, _, model, batches = setup
    times = optimisations.optimizer_step_times(cfg, model, batches[0], warmup=1, repeats=1)
    assert set(times) == {"for-loop", "foreach", "fused"}
    assert optimisations.optimizer_losses_agree(cfg, model, batches, "fused") < 1e-4
    norms = optimisations.grad_norm_times(cfg, model, batches[0], warmup=0, repeats=1)
    assert set(norms) == {"guard_norm", "clip"}
    assert all(p.grad is None for p in model.parameters())
    ratio, diff, configured = optimisations.fused_adamw_effect(cfg, model, batches, warmup=2)
    assert configured == "foreach" and ratio > 0 and diff < 1e-4


def test_checkpointing_recomputes_the_same_losses(setup):
    cfg, _, model, batches = setup
    ratio, diff = optimisations.checkpointing_effect(cfg, model, batches, warmup=1)
    assert diff == 0.0 and ratio > 0
    assert not model.decoder.is_activation_checkpointing  # only the copy was switched


def test_cold_compile_uses_an_empty_inductor_cache_and_restores_the_setting(monkeypatch):
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", "/somewhere")
    with optimisations._inductor_cache(cold=True):
        fresh = os.environ["TORCHINDUCTOR_CACHE_DIR"]
        assert fresh != "/somewhere" and not os.listdir(fresh)
    assert os.environ["TORCHINDUCTOR_CACHE_DIR"] == "/somewhere"
    with optimisations._inductor_cache(cold=False):
        assert os.environ["TORCHINDUCTOR_CACHE_DIR"] == "/somewhere"


def test_report_writes_one_key_per_figure(tmp_path):
    report = Report()
    report.add("a.ratio", "a ratio", 1.05, "{:.2f}", "<= 1.10", True)
    report.add("b.nan", "not measured", math.nan)
    report.add("c.text", "a note", "not available")
    data = json.loads(report.write(tmp_path / "results.json").read_text())
    assert data["a.ratio"] == 1.05 and data["b.nan"] is None and data["c.text"] == "not available"
    assert data["targets"]["a.ratio"] == {"target": "<= 1.10", "holds": True}
    table = report.table()
    assert "a ratio" in table and "1.05" in table and "yes" in table


def test_bench_main_runs_sections_and_writes_results(world_dir, tmp_path):
    out = tmp_path / "bench"
    args = [
        "--out", str(out), "--world", str(world_dir), "--only", "overhead,generation,compute",
        "--repeats", "1", "--warmup", "1", "--steps", "2", "--new-tokens", "4", "--gen-rows", "2",
        *tiny_train_overrides(world_dir, tmp_path / "run"),
    ]  # fmt: skip
    report = bench_main(args)
    data = json.loads((out / "results.json").read_text())
    assert data["overhead.max_abs_loss_diff"] == 0.0
    assert data["generation.cache_speedup"] > 0
    assert 0 < data["compute.efficiency"]
    assert not [r for r in report.rows if r.key.endswith(".error")]


def test_feature_cache_rows_hold_the_target_on_the_vit_s_encoders(monkeypatch):
    figures = {"padding.random": 0.5, "padding.length_grouped": 0.85}
    for name, step in (("small", 1.2), ("vit_s", 3.7)):
        figures |= {f"{name}.step_speedup": step, f"{name}.load_speedup": step + 1,
                    f"{name}.loss_diff": 0.0, f"{name}.encoder_share": 0.5}  # fmt: skip
    calls = []
    monkeypatch.setattr(feature_cache, "run", lambda **kw: calls.append(kw) or figures)
    report = Report()
    add_feature_cache(report, argparse.Namespace(repeats=2, feature_cache_small_only=False))
    assert calls == [{"repeats": 2, "small_only": False}]
    rows = {r.key: r for r in report.rows}
    assert rows["feature_cache.vit_s.step_speedup"].holds is True
    assert rows["feature_cache.small.step_speedup"].holds is None  # reported, no target
    assert rows["feature_cache.small.loss_diff"].holds is True
    assert rows["feature_cache.padding_length_grouped"].holds is True


def test_feature_cache_run_measures_the_small_preset(tmp_path):
    figures = feature_cache.run(
        repeats=1, records=32, batch_size=8, steps=2, small_only=True, work=tmp_path
    )
    assert figures["small.loss_diff"] < 1e-5
    assert figures["small.step_speedup"] > 0 and 0 < figures["small.encoder_share"] < 1
    assert "vit_s.step_speedup" not in figures
    assert 0 < figures["padding.random"] <= figures["padding.length_grouped"] <= 1


def test_allocator_benchmark_measures_both_settings_in_child_processes(world_dir):
    overrides = ["model=tiny", "data.num_workers=0"]
    results = allocator.run(str(world_dir), repeats=1, threads=1, overrides=overrides)
    assert set(results) == {"default", "kept"}
    for figures in results.values():
        assert set(figures) == set(allocator.FIGURES)
        assert all(ms > 0 for ms in figures.values())


def test_audio_frontend_benchmark_times_both_sides_on_equal_outputs():
    result = audio_frontend.measure(clips=2, repeats=1, overrides=["model=tiny"])
    for figure in audio_frontend.FIGURES:
        assert result[f"{figure}_transformers_ms"] > 0 and result[f"{figure}_channels_last_ms"] > 0
    assert result["max_abs_diff"] < 1e-4


def _tiny_eval_model(world_dir, out):
    """The tiny config's processor and model (random weights, eval mode)."""
    processor, model = build_model(compose_train(tiny_train_overrides(world_dir, out), out))
    return processor, model.eval()


def test_onednn_linear_benchmark_times_both_sides_on_equal_logits(world_dir, tmp_path):
    processor, model = _tiny_eval_model(world_dir, tmp_path)
    result = onednn_linear.measure(model, processor, world_dir, repeats=1)
    for figure in onednn_linear.FIGURES:
        assert result[f"{figure}_linear_ms"] > 0 and result[f"{figure}_onednn_ms"] > 0
    assert result["max_logit_diff"] < 1e-4
    assert result["decoder_products_linear_gflops"] > 0
    assert result["decoder_products_onednn_gflops"] > 0


def test_shared_prefill_benchmark_times_both_prefills_on_equal_first_tokens(world_dir, tmp_path):
    processor, model = _tiny_eval_model(world_dir, tmp_path)
    result = shared_prefill.measure(model, processor, world_dir, repeats=1)
    for n in shared_prefill.CHOICES:
        assert result[f"shared_{n}_ms"] > 0 and result[f"repeated_{n}_ms"] > 0
        assert result[f"same_first_tokens_{n}"] is True


def test_row_groups_benchmark_runs_fewer_positions_for_the_same_losses(world_dir, tmp_path):
    overrides = [*tiny_train_overrides(world_dir, tmp_path), "model.row_groups=3"]
    result = row_groups.measure(batches=2, repeats=1, overrides=overrides)
    assert result["row_groups"] == 3 and result["one_ms"] > 0 and result["grouped_ms"] > 0
    assert 0 < result["positions_share"] < 1  # tiny-world batches mix short and long rows
    assert result["max_loss_diff"] < 1e-5


def test_sample_cache_benchmark_reads_batches_back_faster(world_dir, tmp_path):
    overrides = tiny_train_overrides(world_dir, tmp_path)
    result = sample_cache.measure(records=16, repeats=1, overrides=overrides)
    assert result["records"] == 16 and result["batches"] == 2  # tiny config: batches of 8
    assert result["cached_load_ms"] < result["plain_load_ms"] / 2
    assert result["plain_steps_per_s"] > 0 and result["cached_steps_per_s"] > 0


def test_batcher_load_counts_prefills_per_group(trained_run, world_dir):
    args = ["--ckpt", str(trained_run / "model"), "--world", str(world_dir), "--requests", "8"]
    args += ["--clients", "4", "--max-batch", "4", "--groups", "1", "4", "--rounds", "1"]
    results = batcher_load.main([*args, "--max-tokens", "3", "--max-wait-ms", "10000"])
    assert list(results) == ["one at a time", "prefill_group=1", "prefill_group=4"]
    alone = results["one at a time"]
    assert alone["prefills_per_round"] == 8 and alone["over_one_at_a_time"] == 1.0
    # four clients, groups of four in a batch of four: jobs that come while rows decode wait
    # until the batch is empty (the wait of 10 s is never reached), then start together
    assert 2 <= results["prefill_group=4"]["prefills_per_round"] < 8
    assert 2 <= results["prefill_group=1"]["prefills_per_round"] <= 8
    assert all(r["answers_differing"] == 0 for r in results.values())


def test_full_concurrency_rate_counts_answers_while_every_client_waits():
    # 2 clients: the opening burst is through at the 2nd answer (t=2); the last request left
    # the queue at t=6, so the answers at 3, 5 and 6 count, over 4 s; those at 8 and 9 (the
    # drain) do not
    finished = [9.0, 1.0, 2.0, 3.0, 5.0, 6.0, 8.0]
    assert serve_load.full_concurrency_rate(finished, emptied=6.0, concurrency=2) == 3 / 4
    # one client: every answer after the first, up to the last request
    assert serve_load.full_concurrency_rate([1.0, 2.0, 3.0], emptied=2.5, concurrency=1) == 1 / 1.5
    # no answer between the burst and the last request: no window
    assert serve_load.full_concurrency_rate([1.0, 2.0, 3.0], emptied=2.0, concurrency=2) is None
    assert serve_load.full_concurrency_rate([1.0, 2.0], emptied=1.0, concurrency=2) is None


def test_serve_load_runs_every_configuration_against_real_servers(trained_run, world_dir, tmp_path):
    out = tmp_path / "serve_load.json"
    args = ["--ckpt", str(trained_run / "model"), "--world", str(world_dir), "--requests", "6"]
    results = serve_load.main([*args, "--rounds", "1", "--max-tokens", "2", "--out", str(out)])
    assert (
        json.loads(out.read_text())["batched_over_sequential"] == results["batched_over_sequential"]
    )
    runs = ("batched_c1", "batched_c16", "unbatched_c16")
    for name in runs:
        run = results[name]
        assert run["errors"] == 0 and run["requests_per_s"] > 0
        assert 0 < run["tokens_per_s"] <= 2 * run["requests_per_s"]  # at most 2 tokens each
        assert run["cpu_ms_per_request"]["engine"] > 0  # the model ran in the child process
    # 6 requests from 16 clients: all in the opening burst, no full-concurrency window
    assert results["batched_c16"]["full_concurrency_median"] is None
    assert "batching_on_over_off_full_concurrency" not in results
    assert results["batched_c1"]["full_concurrency_median"] > 0  # 1 client: answers 2 to 5
    rate = {name: results[name]["requests_per_s"] for name in runs}
    # sequential: the batching server's one client at concurrency 1
    over_c1 = rate["batched_c16"] / rate["batched_c1"]
    assert results["batched_over_sequential"] == pytest.approx(over_c1)
    over_off = rate["batched_c16"] / rate["unbatched_c16"]
    assert results["batching_on_over_off"] == pytest.approx(over_off)


def test_print_ratios_names_the_sequential_baseline_and_the_target(capsys):
    results = {
        "batched_c1": {"requests_per_s": 50.0, "full_concurrency_median": 52.0},
        "batched_c16": {"requests_per_s": 160.0, "full_concurrency_median": 180.0},
        "unbatched_c16": {"requests_per_s": 64.0, "full_concurrency_median": 60.0},
    }
    serve_load.print_ratios(results)
    assert results["batched_over_sequential"] == pytest.approx(3.2)  # 160 / 50
    assert results["batching_on_over_off"] == pytest.approx(2.5)  # 160 / 64
    assert results["batching_on_over_off_full_concurrency"] == pytest.approx(3.0)  # 180 / 60
    out = capsys.readouterr().out
    assert "3.20x (target 3: met)" in out and "2.50x" in out and "3.00x" in out
    results["batched_c16"]["requests_per_s"] = 140.0
    serve_load.print_ratios(results)
    assert "2.80x (target 3: NOT met)" in capsys.readouterr().out


def test_round_queue_hands_out_requests_in_order_and_marks_the_last_taken():
    round_ = serve_load.RoundQueue(["a", "b"])
    assert round_.take() == (0, "a") and round_.emptied == 0.0
    assert round_.take() == (1, "b") and round_.emptied > 0.0  # the last one left
    assert round_.take() is None
    round_.answered(1, (0.5, 3))
    assert len(round_.finished) == 1 and round_.finished[0] >= round_.emptied
    assert round_.results == [None, (0.5, 3)]


def test_serve_load_passes_overrides_and_stops_a_server_that_started_when_the_next_fails(
    trained_run, world_dir, tmp_path
):
    """``--set`` reaches both servers: ``batching.prefill_group=2`` suits the batched one (16
    rows) and not the one-at-a-time one (1 row), which refuses to start. The batched server
    that did start is stopped, not left behind."""
    before = _serve_pids()
    args = ["--ckpt", str(trained_run / "model"), "--world", str(world_dir), "--requests", "2"]
    args += ["--set", "batching.prefill_group=2", "--out", str(tmp_path / "out.json")]
    with pytest.raises(RuntimeError, match=r"did not start: .*batching\.max_batch_size=1 .*"):
        serve_load.main(args)
    assert _serve_pids() <= before
    assert not (tmp_path / "out.json").exists()


def _serve_pids() -> set[int]:
    """The pids of the running ``mmfuse-serve`` processes."""
    pids = set()
    for process in psutil.process_iter():
        try:
            if "mmfuse-serve" in " ".join(process.cmdline()):
                pids.add(process.pid)
        except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
            pass  # gone, or not ours to read
    return pids
