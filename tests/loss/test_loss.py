"""``SFMLoss`` inside compiled training steps: ``torch.compile(fullgraph=True)`` traces the whole
step (no graph break) on the PyTorch path (CPU) and on the Triton path (a ``gpu`` test), and gives
the eager loss and gradients."""

import pytest
import torch
from helpers import make_problem

from fastsfm import SFMLoss


def _step_parts(device, dtype=torch.float32, seed=0):
    """A small 'backbone' (two linear layers), the loss, and a batch with shuffled, unequal labels."""
    z, y, mu = make_problem(96, 8, 32, device=device, seed=seed)
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(32, 48), torch.nn.GELU(), torch.nn.Linear(48, 32)).to(device, dtype)
    return model, SFMLoss(mu.float()).to(device), z.to(dtype), y


def _compare(device, backend, dtype=torch.float32, rtol=1e-5, atol=1e-5):
    """The compiled step's loss and parameter gradients against eager; ``atol`` relative to the largest gradient."""
    model, criterion, x, y = _step_parts(device, dtype)

    def step(inputs, labels):
        return criterion(model(inputs), labels)

    eager = step(x, y)
    eager.backward()
    want = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    torch._dynamo.reset()
    compiled = torch.compile(step, fullgraph=True, backend=backend)  # fullgraph: any graph break raises
    got = compiled(x, y)
    got.backward()
    torch.testing.assert_close(got, eager, rtol=rtol, atol=1e-6)
    scale = max(g.abs().max().item() for g in want)  # the last bias's gradient is 0: the loss ignores shifts
    for p, g in zip(model.parameters(), want, strict=True):
        torch.testing.assert_close(p.grad, g, rtol=rtol, atol=atol * scale)
    second = compiled(x, y[torch.randperm(len(y))])  # new labels: no stale cache inside the graph
    assert torch.isfinite(second) and not torch.equal(second, got)


def test_compiled_step_traces_whole_on_the_torch_path():
    _compare("cpu", "aot_eager")


@pytest.mark.slow
def test_compiled_step_with_inductor_on_the_torch_path():
    _compare("cpu", "inductor", rtol=1e-4)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_compiled_step_with_inductor_on_the_triton_path(dtype):
    # bfloat16: inductor fuses the model's ops and rounds other intermediates than eager does; an
    # H200 run measured differences of 1.5e-4 of the largest gradient (bf16's epsilon is 7.8e-3).
    bf16 = dtype == torch.bfloat16
    _compare("cuda", "inductor", dtype, rtol=2e-2 if bf16 else 1e-5, atol=2e-3 if bf16 else 1e-5)


def test_eager_module_still_validates_once_outside_compile():
    """Outside compilation the module keeps its validated, cached row plan (the eager fast path)."""
    model, criterion, x, y = _step_parts("cpu")
    criterion(x, y)
    plan = criterion._plan
    criterion(2 * x, y)
    assert criterion._plan is plan
    with pytest.raises(ValueError, match="labels must lie"):
        criterion(x, y + 100)


def test_prepared_labels_leave_no_sort_in_the_compiled_graph():
    """After ``prepare``, the compiled step uses the prepared row plan: no sort of the labels in the
    graph (without it, one sort per call), and the same loss and gradients as eager."""
    model, criterion, x, y = _step_parts("cpu")
    graphs = []

    def record(gm, example_inputs):
        graphs.append([str(n.target) for n in gm.graph.nodes])
        return gm.forward

    def step(inputs, labels):
        return criterion(model(inputs), labels)

    eager = step(x, y)
    for prepared in (False, True):
        if prepared:
            criterion.prepare(y, x)
        torch._dynamo.reset()
        got = torch.compile(step, fullgraph=True, backend=record)(x, y)
        torch.testing.assert_close(got, eager, rtol=1e-5, atol=1e-6)
        sorts = [t for t in graphs[-1] if "sort" in t]
        assert bool(sorts) != prepared, graphs[-1]
