"""`optim.states: 8bit` (lit_modules/optimizer.py): AdamW with block-quantized moment states (bitsandbytes'
AdamW8bit). Checked against torch's own fp32 AdamW on the same gradients, including gradients whose magnitudes span
orders within a block: the parameters ten steps later, what the states hold and their size in bytes; stepped inside
backward, the same steps; through train.py's path, a checkpoint and an exact resume; and the configurations it does
not support are refused in one line naming the option."""

from __future__ import annotations

import sys

import lightning as L
import pytest
import torch

from experiment.assemble import build_module
from foundation.errors import MissingExtra
from foundation.schema import ConfigError
from lit_modules.adamw8bit import CHUNK, AdamW8bit, _quantize, _table
from lit_modules.optim_in_backward import StepsInBackward
from tests.support.optim import FIT, NO_CLIP, OPTIM, SaveAt, image_and_text_batches, optimizer_of, train
from tests.support.processes import finished_losses, start_sixteen_steps
from tests.support.runs import LossRecorder, fit

SHAPES = [(64, 256), (256, 128), (512,)]  # two quantized matrices and a bias under 4,096 values (kept in fp32)


def _gradients(spread: float, steps: int = 10) -> list[list[torch.Tensor]]:
    """Gradients of log-normal magnitude (sigma = `spread`) and random sign: at spread 2 one block of 256 values
    spans about five orders of magnitude, so their squares (the second moment) span ten."""
    gen = torch.Generator().manual_seed(0)
    return [
        [torch.randn(s, generator=gen) * torch.exp(spread * torch.randn(s, generator=gen)) * 1e-3 for s in SHAPES]
        for _ in range(steps)
    ]


def _run(optimizer_class, gradients) -> tuple[list[torch.Tensor], torch.optim.Optimizer]:
    gen = torch.Generator().manual_seed(1)
    params = [torch.nn.Parameter(0.02 * torch.randn(s, generator=gen)) for s in SHAPES]
    optimizer = optimizer_class(
        [{"params": params[:2], "weight_decay": 0.1}, {"params": params[2:], "weight_decay": 0.0}], lr=1e-3
    )
    for grads in gradients:
        for p, g in zip(params, grads):
            p.grad = g.clone()
        optimizer.step()
    return params, optimizer


@pytest.mark.parametrize("spread, tolerance", [(0.5, 0.04), (2.0, 0.4)])
def test_8bit_states_follow_adamw_in_a_quarter_of_the_bytes(spread, tolerance):
    """Ten steps of torch's AdamW and of the AdamW that `optim.states: 8bit` builds, on the same gradients: the
    parameters' change differs by at most `tolerance` of its norm (measured at most 0.018 and 0.23; torchao's
    AdamW8bit, 12x, at spread 2: lit_modules/optimizer.py), the moments are AdamW's up to their rounding, and a
    quantized state takes one byte per value plus one fp32 scale per block of 256."""
    import bitsandbytes

    gradients = _gradients(spread)
    start, _ = _run(torch.optim.AdamW, [])
    reference, adamw = _run(torch.optim.AdamW, gradients)
    ours, eight_bit = _run(AdamW8bit, gradients)
    for p0, p, q in zip(start, reference, ours):
        expected, delta = p.detach() - p0.detach(), q.detach() - p0.detach()
        assert ((delta - expected).norm() / expected.norm()).item() < tolerance
    for p, q in zip(reference, ours):
        state, fp32 = eight_bit.state[q], adamw.state[p]
        assert state["step"] == 10
        if q.numel() < 4096:  # small tensors (biases, norms) keep fp32 states
            torch.testing.assert_close(state["state1"], fp32["exp_avg"], rtol=1e-5, atol=1e-9)
            continue
        assert state["state1"].dtype == state["state2"].dtype == torch.uint8
        held = sum(state[k].numel() * state[k].element_size() for k in ("state1", "state2", "absmax1", "absmax2"))
        assert held == 2 * q.numel() * (1 + 4 / 256)  # vs 8 bytes per value in fp32
        if spread < 1:  # the first moment from its codes: within the map's rounding of AdamW's (measured 0.026)
            codes = eight_bit.state[q]
            first = bitsandbytes.functional.dequantize_blockwise(
                codes["state1"], absmax=codes["absmax1"], code=codes["qmap1"], blocksize=256
            )
            error = (first - fp32["exp_avg"]).abs().max() / fp32["exp_avg"].abs().max()
            assert error < 0.05


def _bitsandbytes_and_ours(start: torch.Tensor, gradients: list[torch.Tensor]) -> list[tuple]:
    """Each step: (the parameter, its first moment decoded from codes and scales) under bitsandbytes' own AdamW8bit
    and under lit_modules/adamw8bit.py's; and the final states of both."""
    import bitsandbytes

    runs = []
    for optimizer_class in (bitsandbytes.optim.AdamW8bit, AdamW8bit):
        p = torch.nn.Parameter(start.clone())
        optimizer, first = optimizer_class([p], lr=1e-3, weight_decay=0.1), []
        for g in gradients:
            p.grad = g.clone()
            optimizer.step()
            state = optimizer.state[p]
            first.append(
                bitsandbytes.functional.dequantize_blockwise(
                    state["state1"], absmax=state["absmax1"], code=state["qmap1"], blocksize=256
                )
            )
        runs.append((p.detach(), first, optimizer.state[p]))
    return runs


SIZE = 2 * CHUNK + 3 * 256 + 100  # three chunks, the last one ending in a block of 100 values


def _start_and_gradients() -> tuple[torch.Tensor, list[torch.Tensor]]:
    gen = torch.Generator().manual_seed(0)
    start = torch.randn(SIZE, generator=gen) * 0.02
    return start, [torch.randn(SIZE, generator=gen) * torch.exp(torch.randn(SIZE, generator=gen)) for _ in range(3)]


def test_the_cpu_step_is_bitsandbytes_step_up_to_rounding():
    """lit_modules/adamw8bit.py steps a CPU parameter a chunk at a time, the update in torch's fused AdamW kernel:
    over three steps, chunks and a last, partial block, the parameter is bitsandbytes' own whole-tensor step's up to
    float rounding (measured 1.2e-7 of its change), the scales too (2.4e-7), and the codes are the same but where
    a value lies on the boundary between two (measured 2 of 525,156, by one)."""
    start, gradients = _start_and_gradients()
    (p, _, theirs), (q, _, ours) = _bitsandbytes_and_ours(start, gradients)
    assert ((p - q).norm() / (p - start).norm()).item() < 1e-6
    for key in ("absmax1", "absmax2"):
        torch.testing.assert_close(ours[key], theirs[key], rtol=1e-6, atol=0)
    for key in ("state1", "state2"):
        assert ours[key].dtype == torch.uint8
        differ = (ours[key].int() - theirs[key].int()).abs()
        assert differ.max() <= 1 and (differ > 0).sum() <= 10, key


def test_a_block_without_gradient_decays_without_requantizing():
    """Blocks whose gradient is all zero (the embedding rows no token used) keep their codes, and their first
    moment is exactly beta1 times the last one, as in fp32 AdamW. bitsandbytes re-quantizes them: -1 is not on its
    signed map, so a block whose largest value is negative shrinks by the map's end (0.993) at each step (1.1%
    after two steps, measured); the blocks with a gradient are stepped as bitsandbytes does."""
    start, gradients = _start_and_gradients()
    quiet = slice(0, CHUNK // 2)  # half a chunk of blocks, without gradient after the first step
    for g in gradients[1:]:
        g[quiet] = 0
    (p, theirs, _), (q, ours, _) = _bitsandbytes_and_ours(start, gradients)
    decayed = 0.9**2 * ours[0][quiet]
    assert ((ours[2][quiet] - decayed).abs().max() / decayed.abs().max()).item() < 1e-6
    assert ((theirs[2][quiet] - decayed).abs().max() / decayed.abs().max()).item() > 1e-3  # bitsandbytes' drift
    busy = slice(CHUNK, None)  # as in the test above: the same codes but on a boundary (measured 1 of 263,012)
    assert (~torch.isclose(ours[2][busy], theirs[2][busy], rtol=1e-6, atol=1e-9)).sum() <= 5
    assert ((q[busy] - p[busy]).norm() / (p[busy] - start[busy]).norm()).item() < 1e-4


@pytest.mark.parametrize("signed", [True, False])  # the first moment's map, and the second's (values >= 0)
def test_the_quantizer_gives_bitsandbytes_own_codes(signed):
    """lit_modules/adamw8bit.py's quantizer restates bitsandbytes' CPU one in torch ops: the same codes and scales,
    bit for bit, over blocks whose magnitudes span orders, an all-zero block and one holding a single value."""
    from bitsandbytes.functional import create_dynamic_map

    gen = torch.Generator().manual_seed(0)
    blocks = torch.randn(1024, 256, generator=gen) * torch.exp(3 * torch.randn(1024, 256, generator=gen))
    blocks[3] = 0.0
    blocks[5] = 0.0
    blocks[5, 17] = -2.5
    if not signed:
        blocks = blocks.abs()
    qmap = create_dynamic_map(signed=signed).float()
    expected_codes, expected_absmax = torch.ops.bitsandbytes.quantize_blockwise(blocks, qmap, 256)
    codes = torch.empty(1024, 256, dtype=torch.uint8)
    absmax = _quantize(blocks, _table(qmap.numpy().tobytes()), codes)
    assert torch.equal(codes, expected_codes) and torch.equal(absmax, expected_absmax)


def test_a_sparse_gradient_steps_as_its_dense_form():
    """An embedding's sparse gradient (`nn.Embedding(sparse=True)`: the rows the batch used) steps as the same
    gradient made dense, over chunks, rows that straddle blocks (96 values a row) and a last, partial block: bit
    for bit where a row was used once; a row used three times sums its three parts in another order (measured: 2
    of its 96 values differ in the last bit), and so may the codes of its states."""
    gen = torch.Generator().manual_seed(0)
    start = torch.randn(6001, 96, generator=gen) * 0.02  # 576,096 values: 2 chunks and a partial third
    runs, used = [], torch.zeros(6001, dtype=torch.long)
    for sparse in (True, False):
        weight = torch.nn.Parameter(start.clone())
        optimizer = AdamW8bit([weight], lr=1e-3, weight_decay=0.1)
        for step in range(3):
            ids = torch.randint(0, 6001, (4, 50), generator=torch.Generator().manual_seed(step))
            ids[0, :3] = 7  # one row used three times
            used += torch.bincount(ids.flatten(), minlength=6001) * sparse
            out = torch.nn.functional.embedding(ids, weight, sparse=sparse)
            (out * torch.randn(out.shape, generator=torch.Generator().manual_seed(10 + step))).sum().backward()
            assert weight.grad.is_sparse == sparse
            optimizer.step()
            optimizer.zero_grad()
        runs.append((weight.detach(), optimizer.state[weight]))
    (p, rows), (q, dense) = runs
    once = used <= 1
    assert torch.equal(p[once], q[once]) and not torch.equal(p, start)
    torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-9)
    for key in ("state1", "state2", "absmax1", "absmax2"):
        assert (rows[key] != dense[key]).sum() <= 2, key


def test_the_module_builds_8bit_adamw_with_each_parts_settings(tiny_cfg):
    import bitsandbytes

    module = build_module(tiny_cfg(*OPTIM, "optim.states=8bit"))
    optimizer, _ = optimizer_of(module, steps=6)
    assert type(optimizer) is AdamW8bit and isinstance(optimizer, bitsandbytes.optim.AdamW8bit)
    # each part's peak rate (OPTIM's lr_per_part; the scheduler keeps it as initial_lr, warm-up starts at 0) and
    # weight decay (never on biases and norms)
    settings = {g["name"]: (g["initial_lr"], g["lr"], g["weight_decay"]) for g in optimizer.param_groups}
    assert settings["llm"] == (0.003, 0.0, 0.1) and settings["llm_no_decay"] == (0.003, 0.0, 0.0)
    assert settings["projector"] == (0.01, 0.0, 0.1) and settings["encoder"] == (1e-3, 0.0, 0.1)
    assert optimizer.args.optim_bits == 8


def test_8bit_states_step_the_same_inside_backward_and_resume_exactly(tiny_cfg, tmp_path):
    """The optimizer alone: `optim.in_backward` with 8bit states gives the parameters of the normal path's step up to
    rounding, its input embedding's gradient sparse there and dense in the normal path (a 256-token vocabulary, so the
    embedding's states are 8-bit and most of its rows get no gradient). Then train.py's own path: a fit with 8bit
    states, and the same fit resumed from its step-2 checkpoint (which holds the 8-bit codes, and loads with
    weights_only): the same losses at steps 3 and 4."""
    modules, optimizers = {}, {}
    for in_backward in (False, True):
        L.seed_everything(0)
        vocab = "model.llm.config.vocab_size=256"  # 256 x 32 values: over bitsandbytes' 4,096 for 8-bit states
        cfg = tiny_cfg(*OPTIM, NO_CLIP, vocab, "optim.states=8bit", f"optim.in_backward={in_backward}")
        modules[in_backward] = build_module(cfg)
        optimizers[in_backward] = optimizer_of(modules[in_backward], steps=6)
    assert isinstance(optimizers[True][0], StepsInBackward)
    # stepped in backward, the input embedding's gradient comes sparse (the rows the batch used), and dense again
    # once the fit is over
    embeddings = {k: m.model.llm.get_input_embeddings() for k, m in modules.items()}
    assert embeddings[True].sparse and not embeddings[False].sparse
    batches = image_and_text_batches(modules[True].model)
    for in_backward, module in modules.items():
        train(module, *optimizers[in_backward], batches, in_backward)
    normal = dict(modules[False].model.named_parameters())
    for name, p in modules[True].model.named_parameters():
        # a row the batches use many times sums its parts in another order, sparse or dense; at a code boundary the
        # rounding moves a value by one code (measured at most 1.5e-5 of a tensor's largest value)
        assert ((p - normal[name]).abs().max() / normal[name].abs().max()).item() < 1e-4, name
    assert optimizers[True][0].state[embeddings[True].weight]["state1"].dtype == torch.uint8
    modules[True].teardown("fit")
    assert not embeddings[True].sparse

    runs = {}
    for name in ("whole", "resumed"):
        extra = (f"resume={runs['whole'][1]}",) if name == "resumed" else ()
        checkpoint, losses = str(tmp_path / f"{name}-step2.ckpt"), LossRecorder()
        cfg = tiny_cfg(*OPTIM, *FIT, "optim.states=8bit", *extra, f"logging.run_name={name}")
        fit(cfg, losses, SaveAt(2, checkpoint))
        runs[name] = (losses.losses, checkpoint)
    whole, resumed = runs["whole"][0], runs["resumed"][0]
    assert sorted(whole) == [1, 2, 3, 4] and sorted(resumed) == [3, 4]
    assert resumed == {s: whole[s] for s in (3, 4)}
    saved = torch.load(runs["whole"][1], weights_only=True)["optimizer_states"][0]["state"]
    # bitsandbytes' state_dict nests the quantized state under one key (its FSDP wrapping)
    codes = [s["__bnb_optimizer_quant_state__"]["state1"] for s in saved.values()]
    assert any(c.dtype == torch.uint8 for c in codes)


@pytest.mark.parametrize(
    "overrides, named",
    [
        (("optim.states=fp16",), "'optim.states' = 'fp16' is not valid; choose one of: fp32, 8bit"),
        (("optim.states=8bit", "optim.fused=true"), "'optim.fused'"),
        (("optim.states=8bit", "trainer.strategy={name: fsdp}"), "trainer.strategy = fsdp"),
        (("optim.states=8bit", "trainer.strategy=deepspeed_stage_2"), "trainer.strategy = deepspeed_stage_2"),
    ],
)
def test_what_8bit_states_do_not_support_is_refused(tiny_cfg, overrides, named):
    with pytest.raises(ConfigError) as refused:
        tiny_cfg(*overrides)
    line = str(refused.value)
    assert "\n" not in line and "'optim.states'" in line and named in line, line


def test_without_bitsandbytes_the_error_names_the_extra(tiny_cfg, monkeypatch):
    module = build_module(tiny_cfg("optim.states=8bit"))
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)  # an import of it fails, as when it is not installed
    monkeypatch.delitem(sys.modules, "lit_modules.adamw8bit")
    with pytest.raises(MissingExtra, match=r"optim.states: 8bit needs the lowmem extra: pip install -e '\.\[lowmem\]'"):
        optimizer_of(module, steps=2)


@pytest.mark.slow  # a one-process and a two-process train.py run side by side: ~25 s on 2 cores
def test_8bit_states_under_ddp_follow_one_process(shapes_root, tmp_path):
    """Two gloo processes x batch 4 against one process x batch 8, 16 steps with 8bit states: each rank steps its
    own full copy from the reduced gradient, so the losses follow the one-process run's up to float rounding of the
    reduced gradient (measured: 5.5e-7 at most)."""
    eight_bit = "optim.states=8bit"
    one = start_sixteen_steps(tmp_path, shapes_root, "one", eight_bit, "trainer.devices=1", "data.batch_size=8")
    two = start_sixteen_steps(
        tmp_path, shapes_root, "two", eight_bit, "trainer.strategy=ddp", "trainer.devices=2", "data.batch_size=4"
    )
    one, two = finished_losses(tmp_path, one, "one"), finished_losses(tmp_path, two, "two")
    assert sorted(one) == sorted(two) == list(range(16))
    for step in one:
        assert two[step] == pytest.approx(one[step], rel=1e-5), (step, one, two)
