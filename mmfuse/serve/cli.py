"""``mmfuse-serve ckpt=<model dir> port=<n>``: loads a model directory and serves it."""

from __future__ import annotations

from pathlib import Path

import hydra
import uvicorn
from fastapi import FastAPI
from omegaconf import DictConfig, OmegaConf

from mmfuse.config import CONFIG_DIR
from mmfuse.model_dir import load_processor_dir
from mmfuse.serve.app import ServerSettings, create_app
from mmfuse.serve.batcher import DynamicBatcher
from mmfuse.serve.engine import EngineProcess, EngineSettings, build_batcher
from mmfuse.serve.media import MediaLimits
from mmfuse.serve.requests import RequestLimits


def build_server(cfg: DictConfig) -> tuple[FastAPI, DynamicBatcher | EngineProcess]:
    """Loads the model and returns the app and its batcher (close it when done): in a child
    process with ``batching.separate_process``, else on a thread of this one."""
    batching = cfg.batching
    engine = EngineSettings(
        ckpt=str(cfg.ckpt),
        device=cfg.device,
        threads=cfg.threads,
        max_batch_size=batching.max_batch_size,
        max_wait_ms=batching.max_wait_ms,
        continuous=batching.continuous,
        prefill_group=batching.get("prefill_group"),
    )
    if batching.separate_process:  # the model is loaded in the child; here the processor only
        batcher, processor = EngineProcess(engine), load_processor_dir(cfg.ckpt)
    else:
        batcher, processor = build_batcher(engine)
    settings = ServerSettings(
        model_name=cfg.model_name or Path(cfg.ckpt).resolve().name,
        api_key=cfg.api_key,
        max_body_bytes=cfg.limits.max_body_bytes,
        default_max_tokens=cfg.default_max_tokens,
        media=MediaLimits(**OmegaConf.to_container(cfg.media, resolve=True)),
        requests=RequestLimits(**OmegaConf.to_container(cfg.requests, resolve=True)),
    )
    return create_app(processor, batcher, settings), batcher


@hydra.main(version_base="1.3", config_path=CONFIG_DIR, config_name="serve")
def main(cfg: DictConfig) -> None:
    """Serves until interrupted."""
    app, batcher = build_server(cfg)
    try:
        uvicorn.run(app, host=cfg.host, port=cfg.port, log_level=cfg.log_level)
    finally:
        batcher.close()


if __name__ == "__main__":
    main()
