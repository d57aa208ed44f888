"""Driver of tests/test_sharded.py: ``egspo train`` / ``egspo sft`` under accelerate's FSDP or DeepSpeed
on CPU processes.

accelerate applies FSDP and DeepSpeed only to GPU-like processes: with ``ACCELERATE_USE_CPU=1`` it forms
a gloo group but prepares the model with DDP, whatever the FSDP/DeepSpeed settings say. To run egspo's
sharded code paths on a CPU-only machine, this driver builds the accelerator exactly as egspo does,
then switches accelerate's state to FSDP (or DeepSpeed) with the plugin accelerate itself builds from
the variables that ``accelerate launch --config_file configs/accelerate/<config>.yaml`` exports.
Everything after that (``prepare``, the ``fully_shard`` wrapping or the DeepSpeed engine, state dicts,
clipping, the trainer) is the real code. DeepSpeed runs on CPU through its CPU accelerator
(``DS_ACCELERATOR=cpu``, gloo).

    torchrun --nproc_per_node 2 tests/sharded_driver.py [--dump DIR] train --config run.yaml ...

``--dump DIR`` (train only) writes every rank's gathered full weights after training to
``DIR/rank{r}.safetensors``, so that the test can check that both ranks hold the same model.
``--dump-reference DIR`` (train, full fine-tuning with rl.beta > 0) writes, after training, every rank's
gathered KL reference weights and the reference's logits on a fixed batch to ``DIR/rank{r}.safetensors``
(``weight.<name>``, ``input_ids``, ``logits``, ``sharded``), so that the test can compare them with the initial model.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
from pathlib import Path

import torch
from accelerate import Accelerator, PartialState
from accelerate.utils import (
    DeepSpeedPlugin,
    DistributedType,
    FullyShardedDataParallelPlugin,
)

from egspo import run_setup
from egspo.config import EGSPOConfig


def sharded_accelerator(train: EGSPOConfig) -> Accelerator:
    """egspo's accelerator, switched to FSDP or DeepSpeed (on a GPU machine, accelerate does this itself)."""
    acc = run_setup.make_accelerator(train)
    if os.environ.get("ACCELERATE_USE_DEEPSPEED") == "true":
        import deepspeed.ops

        # DeepSpeed's comm backend on its CPU accelerator JIT-compiles a shared-memory op that only its
        # inference all-reduce uses (about 90 s on a fresh machine, so every CI run); training goes through
        # torch.distributed's collectives either way, so the tests skip the build.
        deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
        plugin = DeepSpeedPlugin()  # from the ACCELERATE_DEEPSPEED_* environment, as Accelerator() does on GPUs
        plugin.set_mixed_precision("no")
        _switch(acc, DistributedType.DEEPSPEED)
        acc.state.deepspeed_plugins = plugin
        acc.deepspeed_engine_wrapped = None
        plugin.select(_from_accelerator_state=True)
    else:
        plugin = FullyShardedDataParallelPlugin()  # from the FSDP_* environment, as Accelerator() does on GPUs
        _switch(acc, DistributedType.FSDP)
        acc.state.fsdp_plugin = plugin
    return acc


def _switch(acc: Accelerator, kind: DistributedType) -> None:
    acc.state.distributed_type = kind
    PartialState._shared_state["distributed_type"] = kind


def dump_full_weights(model: torch.nn.Module, path: Path) -> None:
    from safetensors.torch import save_file
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        get_model_state_dict,
    )

    state = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True))
    save_file({k: v.detach().cpu().contiguous() for k, v in state.items()}, str(path))


def reference_input_ids(vocab_size: int) -> torch.Tensor:
    """The fixed batch the reference is run on (and the test runs the initial model on)."""
    return torch.randint(4, vocab_size, (3, 12), generator=torch.Generator().manual_seed(0))


def dump_reference(dlm, path: Path) -> None:
    """The reference's whole weights (gathered under ZeRO-3, a collective) and its logits on a fixed batch."""
    from safetensors.torch import save_file

    from egspo.models.adapter import unwrap, weights_sharded

    reference = dlm.reference
    core = unwrap(reference)
    params = list(core.parameters())
    gathered = contextlib.nullcontext()
    if any(hasattr(p, "ds_id") for p in params):
        import deepspeed

        gathered = deepspeed.zero.GatheredParameters(params, modifier_rank=None)
    with gathered:
        tensors = {f"weight.{k}": v.detach().cpu().clone().contiguous() for k, v in core.state_dict().items()}
    ids = reference_input_ids(core.config.vocab_size).to(dlm.device)
    with torch.no_grad(), dlm.reference_model() as model:  # a collective forward under ZeRO-3
        logits = dlm.logits(ids, model=model).float()
    sharded = torch.tensor([weights_sharded(reference)])
    save_file({**tensors, "input_ids": ids.cpu(), "logits": logits.cpu().contiguous(), "sharded": sharded}, str(path))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--dump", type=Path)
    parser.add_argument("--dump-reference", type=Path)
    args, cli_args = parser.parse_known_args()
    assert "true" in (os.environ.get("ACCELERATE_USE_FSDP"), os.environ.get("ACCELERATE_USE_DEEPSPEED")), (
        "run with the FSDP or DeepSpeed environment of an accelerate config")

    import egspo.rl.trainer as trainer_module
    import egspo.sft as sft_module
    from egspo.cli import main as cli_main

    trainer_module.make_accelerator = sharded_accelerator
    sft_module.make_accelerator = sharded_accelerator
    if args.dump is not None:
        run = trainer_module.EGSPOTrainer.train

        def run_and_dump(self, *a, **k):
            out = run(self, *a, **k)
            from egspo.models.adapter import weights_sharded

            assert weights_sharded(self.dlm.model) or os.environ.get("ACCELERATE_USE_DEEPSPEED") == "true"
            args.dump.mkdir(parents=True, exist_ok=True)
            dump_full_weights(self.dlm.model, args.dump / f"rank{self.accelerator.process_index}.safetensors")
            return out

        trainer_module.EGSPOTrainer.train = run_and_dump
    if args.dump_reference is not None:
        run_reference = trainer_module.EGSPOTrainer.train

        def run_and_dump_reference(self, *a, **k):
            out = run_reference(self, *a, **k)
            assert self.dlm.reference is not None, "no KL reference copy (full fine-tuning with rl.beta > 0)"
            args.dump_reference.mkdir(parents=True, exist_ok=True)
            dump_reference(self.dlm, args.dump_reference / f"rank{self.accelerator.process_index}.safetensors")
            return out

        trainer_module.EGSPOTrainer.train = run_and_dump_reference
    sys.exit(cli_main(cli_args))


if __name__ == "__main__":
    main()
