"""Distributed QLoRA on CPU: FSDP2 (fully_shard) and DDP with the gloo backend, 2 processes.

One launch of two worker processes (this file run as a script, with torchrun's environment:
RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT) runs every distributed scenario on a tiny
LlamaForCausalLM (hidden 64, 2 layers, every linear layer a QLoRALinear on an NF4 base) and
writes its measurements; the tests compare them with single-process runs made here.
The global batch is 8 sequences; each rank takes 4, and DDP/FSDP average the gradients, so the
single-process reference trains on all 8 with the mean loss.
"""
from __future__ import annotations

import json
import math
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
if __name__ == "__main__":  # worker: make nf4kern importable
    sys.path.insert(0, str(ROOT))

from nf4kern import distributed as nd  # noqa: E402
from nf4kern.nn import Linear4bit, Params4bit  # noqa: E402
from nf4kern.qlora import QLoRALinear, prepare_qlora  # noqa: E402

WORLD = 2
STEPS = 5
BATCH, SEQ, VOCAB = 8, 16, 128
LR = 1e-2
LOSS_TOL = 1e-5


# -- the model and the training loop (shared by the workers and the reference) -------------------


def build(seed: int, storage: torch.dtype = torch.uint8) -> nn.Module:
    """Tiny Llama, quantized (NF4, double quant, blocksize 64) with r=4 adapters everywhere but
    lm_head; lora_B starts non-zero so every adapter gets a gradient from step one."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64, attention_dropout=0.0,
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config)
    prepare_qlora(model, r=4, lora_alpha=8, verbose=False)
    g = torch.Generator().manual_seed(seed + 1000)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, QLoRALinear):
                module.lora_B.copy_(torch.randn(module.lora_B.shape, generator=g) * 0.02)
    if storage != torch.uint8:
        nd.to_float_storage(model, storage)
    return model


def batches() -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(7)
    return [torch.randint(0, VOCAB, (BATCH, SEQ), generator=g) for _ in range(STEPS)]


def probe_ids() -> torch.Tensor:
    return torch.randint(0, VOCAB, (2, SEQ), generator=torch.Generator().manual_seed(11))


def trainable(model: nn.Module) -> list[nn.Parameter]:
    return [p for p in model.parameters() if p.requires_grad]


def train(model: nn.Module, params, rank: int = 0, world: int = 1) -> list[float]:
    """STEPS AdamW steps; each rank takes its slice of the global batch. Returns the global mean
    loss per step (averaged over ranks with an all-reduce when world > 1)."""
    opt = torch.optim.AdamW(params, lr=LR)
    losses = []
    for ids in batches():
        local = ids.chunk(world)[rank]
        loss = model(input_ids=local, labels=local).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        value = loss.detach().clone()
        if world > 1:
            import torch.distributed as dist

            dist.all_reduce(value)
            value /= world
        losses.append(value.item())
    return losses


def as_bytes(t: torch.Tensor) -> torch.Tensor:
    return t.detach().contiguous().reshape(-1).view(torch.uint8)


def same_state_dicts(a: dict, b: dict) -> list[str]:
    """Keys whose entries differ (byte for byte: packed bf16 storage may hold NaN patterns)."""
    bad = sorted(set(a) ^ set(b))
    bad += [k for k in a if k in b and (a[k].dtype != b[k].dtype or a[k].shape != b[k].shape or not torch.equal(as_bytes(a[k]), as_bytes(b[k])))]
    return bad


# -- the worker -----------------------------------------------------------------------------------


def _max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    d = (a.detach().float() - b.detach().float()).abs().max().item()
    return d if math.isfinite(d) else float("inf")


def _worker(out: Path) -> None:
    import datetime

    import torch.distributed as dist

    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    torch.set_num_threads(1)
    dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=60))
    res: dict = {"rank": rank}
    try:
        model = _fsdp_scenario(rank, world, out, res)
        _checkpoint_scenario(model, out, res)
        _mixed_precision_scenario(res)
        _ddp_scenario(rank, world, out, res)
    finally:
        (out / f"rank{rank}.json").write_text(json.dumps(res))
        dist.destroy_process_group()


def _fsdp_scenario(rank, world, out, res):
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
    from torch.distributed.fsdp import FSDPModule

    model = nd.shard_qlora_model(build(0, torch.bfloat16))
    res["fsdp_units"] = [n for n, m in model.named_modules() if isinstance(m, FSDPModule)]
    res["bytes"] = nd.quantized_weight_bytes(model)
    lora = [p for n, p in model.named_parameters() if "lora_" in n]
    res["lora_local"] = sum(p.to_local().numel() for p in lora)
    res["lora_total"] = sum(p.numel() for p in lora)
    res["base_dtypes"] = sorted({str(m.weight.dtype) for m in model.modules() if isinstance(m, Linear4bit)})

    seen = []  # what QLoRALinear.forward finds in base_layer.weight once FSDP has all-gathered it

    def look(module, args):
        w = module.base_layer.weight
        seen.append([type(w).__name__, isinstance(w, Params4bit), hasattr(w, "quant_state"), list(w.shape)])

    hooks = [m.register_forward_pre_hook(look) for m in model.modules() if isinstance(m, QLoRALinear)]
    full = StateDictOptions(full_state_dict=True, cpu_offload=True)
    initial = get_model_state_dict(model, options=full)
    res["losses"] = train(model, trainable(model), rank, world)
    for h in hooks:
        h.remove()
    res["seen"] = seen[:14]  # the first forward: 7 layers x 2 blocks
    final = get_model_state_dict(model, options=full)
    if rank == 0:
        torch.save(initial, out / "fsdp_initial.pt")
        torch.save(final, out / "fsdp_final.pt")
    return model


def _checkpoint_scenario(model, out, res):
    """Save the trained sharded model and load it into a sharded model with other weights."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict, set_model_state_dict

    ids = probe_ids()
    with torch.no_grad():
        want = model(input_ids=ids).logits
    full_opts = StateDictOptions(full_state_dict=True)
    full = get_model_state_dict(model, options=full_opts)

    def fresh():
        return nd.shard_qlora_model(build(99, torch.bfloat16))

    def check(name, loaded):
        with torch.no_grad():
            res[f"{name}_diff"] = _max_diff(loaded(input_ids=ids).logits, want)
        res[f"{name}_mismatch"] = same_state_dicts(get_model_state_dict(loaded, options=full_opts), full)

    # full state dict, every rank holding it
    m = fresh()
    with torch.no_grad():
        res["fresh_diff"] = _max_diff(m(input_ids=ids).logits, want)
    # a copy: set_model_state_dict replaces the entries of the dict it is given by the model's DTensors
    res["full_load"] = str(set_model_state_dict(m, dict(full), options=full_opts))
    check("full", m)

    # full state dict on rank 0 only (cpu_offload), broadcast while loading
    rank0 = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    res["rank0_entries"] = len(rank0)
    m = fresh()
    nd.load_full_state_dict(m, rank0, broadcast_from_rank0=True)
    check("bcast", m)

    # into a model whose units stay unsharded after forward (reshard_after_forward=False): the
    # helper reshards first, and the reused unsharded parameter must not keep the old quant_state
    m = nd.shard_qlora_model(build(99, torch.bfloat16), reshard_after_forward=False)
    with torch.no_grad():
        m(input_ids=ids)
    nd.load_full_state_dict(m, full)
    check("unsharded", m)

    # a uint8 (bitsandbytes' default storage) checkpoint into bfloat16 storage: refused, then converted
    m = fresh()
    try:
        set_model_state_dict(m, nd.state_dict_storage(full, torch.uint8), options=full_opts)
        res["u8_error"] = None
    except Exception as e:  # noqa: BLE001 - recorded and asserted by the test
        res["u8_error"] = f"{type(e).__name__}: {e}"
    nd.load_full_state_dict(m, nd.state_dict_storage(nd.state_dict_storage(full, torch.uint8), torch.bfloat16))
    check("u8_converted", m)

    # sharded state dict through torch.distributed.checkpoint
    sharded = get_model_state_dict(model)
    res["sharded_types"] = sorted({type(v).__name__ for k, v in sharded.items() if k.endswith("q_proj.base_layer.weight")})
    dcp.save(sharded, checkpoint_id=out / "dcp")
    m = fresh()
    res["dcp_load"] = str(nd.load_sharded_checkpoint(m, out / "dcp"))
    check("dcp", m)


def _mixed_precision_scenario(res):
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    ids = probe_ids()
    with torch.no_grad():
        fp32 = build(0)(input_ids=ids).logits
    policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    logits = {}
    for storage in (torch.bfloat16, torch.uint8):
        model = nd.shard_qlora_model(build(0, storage), mp_policy=policy)
        out = model(input_ids=ids, labels=ids)
        out.loss.backward()
        logits[storage] = out.logits.detach()
        res[f"mp_grads_finite_{storage}"] = all(torch.isfinite(p.grad.full_tensor()).all().item() for p in trainable(model))
    res["mp_storage_diff"] = _max_diff(logits[torch.bfloat16], logits[torch.uint8])
    res["mp_vs_fp32"] = _max_diff(logits[torch.bfloat16], fp32)
    res["fp32_scale"] = fp32.abs().max().item()
    # What shard_qlora_model's check prevents: fp16 packed storage under a bf16 policy, sharded
    # by hand, is value-cast by FSDP2 (same byte count, different bytes).
    raw = build(0, torch.float16)
    for layer in raw.model.layers:
        fully_shard(layer, mp_policy=policy)
    fully_shard(raw, mp_policy=policy)
    with torch.no_grad():
        res["mp_fp16_storage_diff"] = _max_diff(raw(input_ids=ids).logits, fp32)


def _ddp_scenario(rank, world, out, res):
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
    from torch.nn.parallel import DistributedDataParallel as DDP

    ids = probe_ids()
    with torch.no_grad():
        want = build(0)(input_ids=ids).logits
    # Each rank quantizes different weights (seed = rank): DDP broadcasts rank 0's parameters,
    # packed bytes included, but not the quantization state (no parameter, no buffer).
    model = build(rank)
    ddp = DDP(model)
    with torch.no_grad():
        res["ddp_before_sync_diff"] = _max_diff(model(input_ids=ids).logits, want)
        nd.broadcast_quant_states(model)
        res["ddp_after_sync_diff"] = _max_diff(model(input_ids=ids).logits, want)
    names = {id(p): n for n, p in model.named_parameters()}
    res["ddp_reducer"] = sorted(names[id(p)] for p in ddp._build_params_for_reducer()[0])
    res["ddp_trainable"] = sorted(n for n, p in model.named_parameters() if p.requires_grad)
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    res["ddp_frozen_4bit"] = sorted(n for n, p in model.named_parameters() if isinstance(p, Params4bit))
    res["ddp_losses"] = train(ddp, trainable(model), rank, world)
    res["ddp_frozen_changed"] = [n for n, p in model.named_parameters() if n in frozen and not torch.equal(as_bytes(p), as_bytes(frozen[n]))]
    res["ddp_frozen_grads"] = [n for n, p in model.named_parameters() if not p.requires_grad and p.grad is not None]
    nd.enable_distributed_state_dict(ddp)  # get_model_state_dict walks the bnb keys as attributes
    sd = get_model_state_dict(ddp, options=StateDictOptions(full_state_dict=True))
    res["ddp_sd_keys"] = sorted(sd)
    if rank == 0:
        torch.save({k: v for k, v in model.state_dict().items() if "lora_" in k}, out / "ddp_lora.pt")


# -- the launch -----------------------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    dist = pytest.importorskip("torch.distributed")
    if not dist.is_available():
        pytest.skip("torch.distributed is not available in this torch build")
    if not dist.is_gloo_available():
        pytest.skip("the gloo backend is not available in this torch build")
    pytest.importorskip("transformers")
    out = tmp_path_factory.mktemp("dist")
    env = dict(os.environ, MASTER_ADDR="127.0.0.1", MASTER_PORT=str(_free_port()), WORLD_SIZE=str(WORLD), OMP_NUM_THREADS="1")
    procs = [
        subprocess.Popen(
            [sys.executable, __file__, str(out)], env=dict(env, RANK=str(r), LOCAL_RANK=str(r)),
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=ROOT,
        )
        for r in range(WORLD)
    ]
    logs = []
    for p in procs:
        try:
            logs.append(p.communicate(timeout=240)[0])
        except subprocess.TimeoutExpired:
            for q in procs:
                q.kill()
            logs.append(p.communicate()[0] + "\n[timed out]")
    if any(p.returncode != 0 for p in procs):
        pytest.fail("distributed workers failed:\n" + "\n".join(f"--- rank {r} ---\n{log[-4000:]}" for r, log in enumerate(logs)))
    results = [json.loads((out / f"rank{r}.json").read_text()) for r in range(WORLD)]
    return {"out": out, "ranks": results}


@pytest.fixture(scope="module")
def reference():
    """The single-process run on the whole batch (uint8 storage: the storage is only a view)."""
    pytest.importorskip("transformers")
    model = build(0)
    initial = model.state_dict()
    initial = {k: v.clone() for k, v in initial.items()}
    losses = train(model, trainable(model))
    return {"model": model, "initial": initial, "losses": losses}


# -- FSDP2 ----------------------------------------------------------------------------------------


def test_fsdp2_loss_matches_single_process(run, reference):
    for r in run["ranks"]:
        assert r["losses"] == pytest.approx(reference["losses"], abs=LOSS_TOL, rel=0)
    assert reference["losses"][-1] < reference["losses"][0]  # it trains


def test_fsdp2_units_are_blocks_and_root(run):
    assert run["ranks"][0]["fsdp_units"] == ["", "model.layers.0", "model.layers.1"]
    assert run["ranks"][0]["base_dtypes"] == ["torch.bfloat16"]


def test_fsdp2_shards_packed_weights_and_adapters(run, reference):
    unsharded = nd.quantized_weight_bytes(reference["model"])
    per_rank = [r["bytes"] for r in run["ranks"]]
    for b in per_rank:
        assert b["packed_total"] == unsharded["packed_total"] == 36864  # 2 x 36864 weights, 4 bits each
        assert b["packed_local"] == b["packed_total"] // WORLD  # every dim 0 divides evenly here
        assert b["state"] == unsharded["state"]  # replicated
    assert sum(b["packed_local"] for b in per_rank) == unsharded["packed_total"]
    for r in run["ranks"]:
        assert r["lora_local"] * WORLD == r["lora_total"]


def test_fsdp2_forward_sees_plain_unsharded_weight(run):
    # FSDP2 swaps in a plain Parameter (no Params4bit, no quant_state): Linear4bit._quant_state()
    # falls back to the module's quant_state, and the full packed column is there.
    seen = run["ranks"][0]["seen"]
    assert len(seen) == 14
    for kind, is_4bit, has_state, shape in seen:
        assert (kind, is_4bit, has_state) == ("Parameter", False, False)
        assert shape[1] == 1 and shape[0] in (512, 1024, 2048)  # the whole bf16 column, not a shard


def test_full_state_dict_has_bnb_keys_and_unsharded_values(run, reference):
    initial = torch.load(run["out"] / "fsdp_initial.pt", weights_only=True)
    want = nd.state_dict_storage(reference["initial"], torch.bfloat16)
    assert same_state_dicts(initial, want) == []
    prefix = "model.layers.0.self_attn.q_proj.base_layer.weight"
    for suffix in ("", ".absmax", ".quant_map", ".nested_absmax", ".nested_quant_map", ".quant_state.bitsandbytes__nf4"):
        assert prefix + suffix in initial
    # after training: frozen entries unchanged, adapters as in the single-process run
    final = torch.load(run["out"] / "fsdp_final.pt", weights_only=True)
    frozen = [k for k in initial if "lora_" not in k]
    assert same_state_dicts({k: final[k] for k in frozen}, {k: initial[k] for k in frozen}) == []
    trained = reference["model"].state_dict()
    for k in initial:
        if "lora_" in k:
            torch.testing.assert_close(final[k], trained[k], atol=1e-5, rtol=1e-4)


def test_full_state_dict_round_trip(run):
    for r in run["ranks"]:
        assert r["fresh_diff"] > 0.1  # the fresh model really differs before loading
        assert r["full_load"] == "<All keys matched successfully>"
        assert r["full_diff"] == 0.0 and r["full_mismatch"] == []


def test_full_state_dict_broadcast_from_rank0(run):
    assert [r["rank0_entries"] for r in run["ranks"]][1] == 0  # only rank 0 held it
    for r in run["ranks"]:
        assert r["bcast_diff"] == 0.0 and r["bcast_mismatch"] == []


def test_full_state_dict_load_after_unresharded_forward(run):
    for r in run["ranks"]:
        assert r["unsharded_diff"] == 0.0 and r["unsharded_mismatch"] == []


def test_uint8_checkpoint_into_float_storage(run):
    for r in run["ranks"]:
        assert r["u8_error"] is not None and "state_dict_storage" in r["u8_error"]
        assert r["u8_converted_diff"] == 0.0 and r["u8_converted_mismatch"] == []


def test_sharded_state_dict_dcp_round_trip(run):
    assert (run["out"] / "dcp" / ".metadata").is_file()
    for r in run["ranks"]:
        assert r["sharded_types"] == ["DTensor"]
        assert r["dcp_load"] == "<All keys matched successfully>"
        assert r["dcp_diff"] == 0.0 and r["dcp_mismatch"] == []


def test_fsdp2_mixed_precision(run):
    for r in run["ranks"]:
        assert r["mp_grads_finite_torch.bfloat16"] and r["mp_grads_finite_torch.uint8"]
        assert r["mp_storage_diff"] == 0.0  # uint8 storage is never cast; bf16 storage == param_dtype
        assert r["mp_vs_fp32"] < 0.02 * r["fp32_scale"]  # bf16 adapters and activations
        assert r["mp_fp16_storage_diff"] > 0.5 * r["fp32_scale"]  # value-cast packed bytes: garbage


# -- DDP ------------------------------------------------------------------------------------------


def test_ddp_loss_matches_single_process(run, reference):
    for r in run["ranks"]:
        assert r["ddp_losses"] == pytest.approx(reference["losses"], abs=LOSS_TOL, rel=0)
    lora = torch.load(run["out"] / "ddp_lora.pt", weights_only=True)
    trained = reference["model"].state_dict()
    for k, v in lora.items():
        torch.testing.assert_close(v, trained[k], atol=1e-5, rtol=1e-4)


def test_ddp_syncs_only_adapters_and_keeps_frozen_weights(run):
    for r in run["ranks"]:
        assert r["ddp_reducer"] == r["ddp_trainable"]
        assert r["ddp_reducer"] and all(".lora_" in n for n in r["ddp_reducer"])
        assert len(r["ddp_frozen_4bit"]) == 14 and not set(r["ddp_frozen_4bit"]) & set(r["ddp_reducer"])
        assert r["ddp_frozen_changed"] == [] and r["ddp_frozen_grads"] == []
        keys = r["ddp_sd_keys"]
        assert "model.layers.1.mlp.down_proj.base_layer.weight.quant_state.bitsandbytes__nf4" in keys
        assert not any(k.startswith("module.") for k in keys)


def test_ddp_needs_quant_state_broadcast(run):
    r0, r1 = run["ranks"]
    assert r0["ddp_before_sync_diff"] == 0.0
    assert r1["ddp_before_sync_diff"] > 0.1  # rank 0's bytes with rank 1's absmax
    assert r0["ddp_after_sync_diff"] == r1["ddp_after_sync_diff"] == 0.0


# -- single process -------------------------------------------------------------------------------


def test_to_float_storage_is_a_view_of_the_same_bytes():
    pytest.importorskip("transformers")
    ids = probe_ids()
    base = build(0)
    with torch.no_grad():
        want = base(input_ids=ids).logits
    for dtype in (torch.bfloat16, torch.float16, torch.float32):
        model = build(0, dtype)
        for (n, a), (_, b) in zip(base.named_modules(), model.named_modules()):
            if isinstance(a, Linear4bit):
                assert b.weight.dtype == dtype and b.quant_storage == dtype and b.weight.quant_state is b.quant_state
                assert torch.equal(as_bytes(a.weight), as_bytes(b.weight)), n
        with torch.no_grad():
            assert torch.equal(model(input_ids=ids).logits, want)
        back = nd.state_dict_storage(model.state_dict(), torch.uint8)
        assert same_state_dicts(back, base.state_dict()) == []


def test_get_model_state_dict_without_sharding():
    pytest.importorskip("transformers")
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, set_model_state_dict

    model = nd.enable_distributed_state_dict(build(0, torch.bfloat16))
    sd = get_model_state_dict(model)
    assert same_state_dicts(sd, model.state_dict()) == []
    other = nd.enable_distributed_state_dict(build(99, torch.bfloat16))
    set_model_state_dict(other, sd)
    assert same_state_dicts(get_model_state_dict(other), sd) == []  # still walkable after a load


def test_shard_units():
    pytest.importorskip("transformers")
    model = build(0)
    assert nd.qlora_shard_units(model) == list(model.model.layers)
    mlp = prepare_qlora(nn.Sequential(nn.Linear(64, 128), nn.GELU(), nn.Linear(128, 64)), r=2, verbose=False)
    assert nd.qlora_shard_units(mlp) == [mlp[0], mlp[2]]  # no block list: one unit per QLoRALinear


def test_shard_qlora_model_refuses_unsafe_setups():
    pytest.importorskip("transformers")
    from torch.distributed.fsdp import MixedPrecisionPolicy

    model = build(0, torch.float16)
    with pytest.raises(ValueError, match="value-cast"):
        nd.shard_qlora_model(model, mp_policy=MixedPrecisionPolicy(param_dtype=torch.bfloat16))
    base = model.model.layers[0].self_attn.q_proj.base_layer
    with pytest.raises(ValueError, match="cannot be an FSDP unit"):
        nd.shard_qlora_model(model, units=[base])


if __name__ == "__main__":
    _worker(Path(sys.argv[1]))
