"""CUDA-graph capture (GPU only): the eager ops do nothing that breaks capture (no host
synchronisation, no data-dependent host logic, allocations from the graph's pool), so a forward +
backward, or a whole training step with the optimizer, can be captured once and replayed.

Each test warms up on a side stream (first calls compile the kernels and cache the launch plans),
captures, then replays on new data copied into the static inputs and compares with eager calls on
the same data: bitwise for the ops (the kernels are deterministic and the replay runs the same
launches), and through a few optimizer steps for the model.
"""
import pytest
import torch

import dyt_kernels as dk

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need CUDA")


def _capture(fn, warmup=3):
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(warmup):
            fn()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = fn()
    return graph, out


def _replay_matches_eager(inputs, fn):
    graph, static_out = _capture(fn)
    for seed in (1, 2):
        torch.manual_seed(seed)
        with torch.no_grad():
            for t in inputs:
                t.copy_(torch.randn_like(t))
        graph.replay()
        torch.cuda.synchronize()
        replayed = [t.clone() for t in static_out]
        eager = fn()
        for r, e in zip(replayed, eager):
            assert torch.equal(r, e)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_dyt_forward_backward_captures(dtype):
    x = torch.randn(8, 64, 384, device="cuda", dtype=dtype, requires_grad=True)
    a = torch.tensor([0.5], device="cuda", requires_grad=True)
    w, b = (torch.randn(384, device="cuda", requires_grad=True) for _ in range(2))
    dy = torch.randn_like(x)

    def fn():
        y = dk.dyt(x, a, w, b)
        return (y, *torch.autograd.grad(y, (x, a, w, b), dy))
    _replay_matches_eager((x, a, w, b, dy), fn)


def test_dyt_modulate_forward_backward_captures():
    x, res = (torch.randn(4, 64, 256, device="cuda", requires_grad=True) for _ in range(2))
    shift, scale, gate = (torch.randn(4, 256, device="cuda", requires_grad=True) for _ in range(3))
    a, w, b = (torch.randn(n, device="cuda", requires_grad=True) for n in (1, 256, 256))
    dh, dr = torch.randn_like(x), torch.randn_like(x)
    leaves = (x, res, shift, scale, gate, a, w, b)

    def fn():
        h, r = dk.dyt_modulate(x, a, shift, scale, w, b, residual=res, gate=gate)
        return (h, r, *torch.autograd.grad((h, r), leaves, (dh, dr)))
    _replay_matches_eager((*leaves, dh, dr), fn)


def test_training_step_captures_whole():
    """forward, backward and AdamW(capturable=True) in one graph, against the same steps run eagerly."""
    def model_and_opt():
        torch.manual_seed(0)
        m = torch.nn.Sequential(torch.nn.Linear(64, 128), dk.DyT(128), torch.nn.GELU(), torch.nn.Linear(128, 64),
                                dk.DyT(64)).cuda()
        return m, torch.optim.AdamW(m.parameters(), lr=1e-2, capturable=True)

    batches = [torch.randn(32, 64, device="cuda") for _ in range(5)]
    eager, eager_opt = model_and_opt()
    for xb in batches:
        eager_opt.zero_grad(set_to_none=True)
        eager(xb).square().mean().backward()
        eager_opt.step()

    model, opt = model_and_opt()
    static_x = batches[0].clone()

    def step():
        opt.zero_grad(set_to_none=True)
        loss = model(static_x).square().mean()
        loss.backward()
        opt.step()
        return (loss,)
    # Warm-up steps change the weights; start again from the same initial state afterwards.
    start = {k: v.clone() for k, v in model.state_dict().items()}
    graph, _ = _capture(step)
    with torch.no_grad():
        model.load_state_dict(start)
        for state in opt.state.values():   # moments and the step counter, in place (the graph holds them)
            for v in state.values():
                if torch.is_tensor(v):
                    v.zero_()
    for xb in batches:
        static_x.copy_(xb)
        graph.replay()
    torch.cuda.synchronize()
    # The replay runs the same kernels on the same data as the eager steps; AdamW's capturable
    # update is the same code either way. Default tolerances, not bitwise: the optimizer's step
    # counter lives on the GPU in both runs, but eager and captured foreach kernels may be chosen
    # differently by the optimizer.
    for (name, p), q in zip(model.named_parameters(), eager.parameters()):
        torch.testing.assert_close(p, q, msg=name)
