"""Tests for qae.core.entropy: chunked entropy and log-probs, masked statistics, predictor."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from qae.core.entropy import (
    entropy_change_predictor,
    masked_mean,
    selective_log_softmax,
    token_covariance,
    token_entropy,
)

D = torch.float64


def _direct_entropy(logits: torch.Tensor) -> torch.Tensor:
    logp = torch.log_softmax(logits.double(), dim=-1)
    return -(logp.exp() * logp).sum(-1)


# --------------------------------------------------------------------------------------
# token_entropy


@settings(max_examples=30, deadline=None)
@given(
    b=st.integers(1, 4),
    t=st.integers(1, 5),
    v=st.integers(1, 40),
    chunk=st.integers(1, 25),
    scale=st.sampled_from([0.1, 1.0, 10.0, 100.0]),
    seed=st.integers(0, 2**31 - 1),
)
def test_chunked_entropy_equals_direct(b, t, v, chunk, scale, seed):
    gen = torch.Generator().manual_seed(seed)
    logits = torch.randn(b, t, v, generator=gen, dtype=D) * scale
    out = token_entropy(logits, chunk_size=chunk)
    assert out.shape == (b, t) and out.dtype == D
    torch.testing.assert_close(out, _direct_entropy(logits), rtol=1e-9, atol=1e-9)


def test_entropy_known_values_and_dtypes():
    v = 1000
    uniform = torch.zeros(2, 3, v)
    torch.testing.assert_close(token_entropy(uniform), torch.full((2, 3), math.log(v)))
    peaked = torch.zeros(1, 1, v)
    peaked[..., 7] = 1e4  # essentially one-hot; no overflow
    assert token_entropy(peaked).item() == pytest.approx(0.0, abs=1e-6)
    # two equal top logits far above the rest: log 2
    two = torch.full((1, 1, v), -1e4)
    two[..., :2] = 50.0
    assert token_entropy(two).item() == pytest.approx(math.log(2), abs=1e-6)
    # -inf logits (a masked vocabulary) drop out instead of producing NaN: 4 of 1000 left
    masked = torch.full((1, 2, v), -math.inf)
    masked[..., :4] = 0.0
    z = masked.clone().requires_grad_()
    torch.testing.assert_close(token_entropy(z, chunk_size=1), torch.full((1, 2), math.log(4)))
    (g,) = torch.autograd.grad(token_entropy(z).sum(), z)
    assert bool(torch.isfinite(g).all()) and bool((g[..., 4:] == 0).all())
    # bfloat16 logits are upcast: float32 output within float32 error of the exact value
    gen = torch.Generator().manual_seed(0)
    z = (torch.randn(3, 5, 4096, generator=gen) * 3).to(torch.bfloat16)
    out = token_entropy(z, chunk_size=4)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out.double(), _direct_entropy(z), rtol=1e-5, atol=1e-5)


def test_entropy_gradcheck_and_gradient_matches_autograd():
    gen = torch.Generator().manual_seed(1)
    z = torch.randn(2, 3, 7, generator=gen, dtype=D, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x: token_entropy(x, chunk_size=4), (z,))
    w = torch.randn(2, 3, generator=gen, dtype=D)
    (g_chunked,) = torch.autograd.grad((token_entropy(z, chunk_size=2) * w).sum(), z)
    (g_direct,) = torch.autograd.grad((_direct_entropy(z) * w).sum(), z)
    torch.testing.assert_close(g_chunked, g_direct)
    # float32 logits: gradient in float32, close to the float64 one
    z32 = z.detach().float().requires_grad_()
    (g32,) = torch.autograd.grad((token_entropy(z32, chunk_size=5) * w.float()).sum(), z32)
    assert g32.dtype == torch.float32
    torch.testing.assert_close(g32.double(), g_direct, rtol=1e-5, atol=1e-6)


def test_entropy_bad_inputs():
    with pytest.raises(ValueError, match="chunk_size"):
        token_entropy(torch.zeros(2, 3), chunk_size=0)
    with pytest.raises(ValueError, match="logits"):
        token_entropy(torch.zeros(2, 3, dtype=torch.long))
    with pytest.raises(ValueError, match="logits"):
        token_entropy(torch.zeros(2, 0))


# --------------------------------------------------------------------------------------
# selective_log_softmax


@settings(max_examples=30, deadline=None)
@given(
    b=st.integers(1, 4),
    t=st.integers(1, 5),
    v=st.integers(1, 40),
    chunk=st.integers(1, 25),
    seed=st.integers(0, 2**31 - 1),
)
def test_selective_log_softmax_equals_gather(b, t, v, chunk, seed):
    gen = torch.Generator().manual_seed(seed)
    logits = torch.randn(b, t, v, generator=gen, dtype=D) * 5
    ids = torch.randint(0, v, (b, t), generator=gen)
    out = selective_log_softmax(logits, ids, chunk_size=chunk)
    ref = torch.log_softmax(logits, -1).gather(-1, ids[..., None]).squeeze(-1)
    torch.testing.assert_close(out, ref, rtol=1e-10, atol=1e-10)


def test_selective_log_softmax_gradients():
    gen = torch.Generator().manual_seed(2)
    z = torch.randn(2, 3, 6, generator=gen, dtype=D, requires_grad=True)
    ids = torch.randint(0, 6, (2, 3), generator=gen)
    assert torch.autograd.gradcheck(lambda x: selective_log_softmax(x, ids, chunk_size=4), (z,))
    bf = (torch.randn(4, 2, 300, generator=gen) * 4).to(torch.bfloat16).requires_grad_()
    ids = torch.randint(0, 300, (4, 2), generator=gen)
    w = torch.randn(4, 2, generator=gen)
    out = selective_log_softmax(bf, ids, chunk_size=3)
    assert out.dtype == torch.float32
    (g,) = torch.autograd.grad((out * w).sum(), bf)
    ref_in = bf.detach().float().requires_grad_()
    ref = torch.log_softmax(ref_in, -1).gather(-1, ids[..., None]).squeeze(-1)
    torch.testing.assert_close(out, ref)
    (g_ref,) = torch.autograd.grad((ref * w).sum(), ref_in)
    assert g.dtype == torch.bfloat16
    torch.testing.assert_close(g.float(), g_ref, rtol=1e-2, atol=1e-2)


def test_selective_log_softmax_bad_inputs():
    z = torch.zeros(2, 3, 5)
    with pytest.raises(ValueError, match="ids"):
        selective_log_softmax(z, torch.zeros(2, 4, dtype=torch.long))
    with pytest.raises(ValueError, match="ids"):
        selective_log_softmax(z, torch.zeros(2, 3))
    with pytest.raises(ValueError, match="ids must lie in"):
        selective_log_softmax(z, torch.full((2, 3), 5))
    with pytest.raises(ValueError, match="ids must lie in"):
        selective_log_softmax(z, torch.full((2, 3), -1))


# --------------------------------------------------------------------------------------
# Peak memory

# Runs in a fresh interpreter with a fixed glibc mmap threshold, so that every large
# buffer is mapped on allocation and unmapped on free: the peak resident set size (VmHWM,
# reset through /proc/self/clear_refs) then tracks the live tensors exactly.
_PEAK_SCRIPT = r"""
import json, re, sys
import torch
from qae.core.entropy import selective_log_softmax, token_entropy

def peak():
    text = open("/proc/self/status").read()
    return int(re.search(r"VmHWM:\s+(\d+)", text).group(1)) / 1024

def extra(fn):
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    before = peak()
    fn()
    return peak() - before

def direct(z):
    logp = torch.log_softmax(z, dim=-1)
    return -(logp.exp() * logp).sum(-1)

n, v, chunk = 128, 131072, 4
logits = torch.randn(2, n // 2, v)
ids = torch.randint(0, v, (2, n // 2))
token_entropy(logits[:, :2], chunk_size=1)  # warm-up: one-time allocations
selective_log_softmax(logits[:, :2], ids[:, :2], chunk_size=1)
out = {"logits": n * v * 4 / 2**20}
with torch.no_grad():
    out["entropy"] = extra(lambda: token_entropy(logits, chunk_size=chunk))
    out["selective"] = extra(lambda: selective_log_softmax(logits, ids, chunk_size=chunk))
    out["direct"] = extra(lambda: direct(logits))
leaf = logits.requires_grad_()
out["entropy_backward"] = extra(lambda: token_entropy(leaf, chunk_size=chunk).sum().backward())
leaf.grad = None
out["selective_backward"] = extra(
    lambda: selective_log_softmax(leaf, ids, chunk_size=chunk).sum().backward()
)
print(json.dumps(out))
"""


@pytest.mark.skipif(
    not (sys.platform.startswith("linux") and Path("/proc/self/clear_refs").exists()),
    reason="needs Linux peak-RSS accounting",
)
def test_chunked_peak_memory_is_bounded():
    # 128 rows x 131,072 vocab in float32: 64 MiB of logits. A direct computation holds
    # several [N, V] float32 temporaries; the chunked code two [4, V] buffers (2 MiB each).
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536", OMP_NUM_THREADS="1")
    proc = subprocess.run(
        [sys.executable, "-c", _PEAK_SCRIPT], env=env, capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 0, proc.stderr
    m = json.loads(proc.stdout.strip().splitlines()[-1])
    size = m["logits"]
    # the measurement sees full-size temporaries (log_softmax, exp, product) ...
    assert m["direct"] > 2.5 * size, m
    # ... and the chunked forward passes create none
    assert m["entropy"] < size / 8, m
    assert m["selective"] < size / 8, m
    # backward: the gradient of the logits (1x) plus chunk buffers, nothing saved at [N, V]
    assert size < m["entropy_backward"] < 1.125 * size, m
    assert size < m["selective_backward"] < 1.125 * size, m


# --------------------------------------------------------------------------------------
# masked_mean, covariance, entropy-change predictor


def test_masked_mean():
    x = torch.tensor([[1.0, 2.0, 100.0], [3.0, -7.0, 5.0]])
    mask = torch.tensor([[1, 1, 0], [1, 0, 1]], dtype=torch.bool)
    assert masked_mean(x, mask).item() == pytest.approx((1 + 2 + 3 + 5) / 4)
    torch.testing.assert_close(masked_mean(x, mask, dim=-1), torch.tensor([1.5, 4.0]))
    assert masked_mean(x, torch.zeros_like(mask)).item() == 0.0
    with pytest.raises(ValueError, match="mask"):
        masked_mean(x, torch.ones(3))


def test_entropy_change_predictor_hand_value():
    # valid tokens: logp [0, -2], A [1, -1] -> means -1, 0; products (1)(1), (-1)(-1) -> 1
    logp = torch.tensor([[0.0, 123.0], [-2.0, -7.0]])
    adv = torch.tensor([[1.0, 50.0], [-1.0, 9.0]])
    mask = torch.tensor([[1, 0], [1, 0]])
    assert entropy_change_predictor(logp, adv, mask).item() == pytest.approx(1.0)
    cov = token_covariance(logp, adv, mask)
    torch.testing.assert_close(cov, torch.tensor([[1.0, 0.0], [1.0, 0.0]]))
    # reinforcing the unlikely token instead flips the sign
    assert entropy_change_predictor(logp, -adv, mask).item() == pytest.approx(-1.0)
    assert entropy_change_predictor(logp, adv, torch.zeros_like(mask)).item() == 0.0
    with pytest.raises(ValueError, match="advantages"):
        entropy_change_predictor(logp, adv[:1], mask)


def _entropy(theta: torch.Tensor) -> torch.Tensor:
    logp = torch.log_softmax(theta, -1)
    return -(logp.exp() * logp).sum()


@settings(max_examples=40, deadline=None)
@given(
    adv=st.lists(st.floats(-2, 2), min_size=3, max_size=3),
    counts=st.sampled_from([(2, 1, 1), (1, 2, 1), (3, 1, 4), (1, 1, 6), (5, 2, 1)]),
)
def test_predictor_matches_entropy_change_of_softmax_natural_gradient(adv, counts):
    # Tabular softmax policy pi = softmax(theta); a natural policy-gradient step of size
    # eta moves theta_a by eta A(a). Cui et al.: H(theta + eta A) - H(theta) =
    # -eta Cov_{a~pi}(log pi(a), A(a)) + O(eta^2). A batch whose tokens occur in the
    # proportions pi estimates that covariance exactly.
    c = torch.tensor(counts, dtype=D)
    pi = c / c.sum()
    theta = pi.log()
    a = torch.tensor(adv, dtype=D)
    tokens = torch.repeat_interleave(torch.arange(3), torch.tensor(counts))  # [n]
    logp = pi.log()[tokens][None]  # [1, n]
    advs = a[tokens][None]  # [1, n]
    cov = entropy_change_predictor(logp, advs, torch.ones_like(logp)).item()
    eta = 1e-4
    change = (_entropy(theta + eta * a) - _entropy(theta)).item()
    assert change == pytest.approx(-eta * cov, abs=5 * eta**2 * (1 + a.abs().max().item()) ** 2)
