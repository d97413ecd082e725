"""Experiment: what SAF would cost per step with its term as one fused CPU kernel.

samkit's SAF term (`samkit.optim.trajectory_kl` plus the record keeping) is ~13 small tensor
operations on the (batch, classes) logits; inside a training step each costs ~10–15 µs, and SAF
costs 1.13–1.20× an SGD step on the main job's MLP (`benchmarks/saf_phases.py`). This script asks
how much of that a fused kernel removes: the whole term — read the record of ``lag`` epochs ago,
the KL value, its closed-form gradient :math:`\\lambda\\tau (p - q)/n`, write the record — as one
C++ function (float32, classes in a row, compiled at run time with
``torch.utils.cpp_extension.load_inline``: it needs a C++ compiler and ninja, and ~30–60 s to
compile the first time), called from a custom autograd function as samkit's term is.

It first checks the kernel against `trajectory_kl` (value and gradient, float32) and that the
record is written, then times SGD, SAF and SAF with the fused term (its memory complete after
8 untimed epochs; the fused path is used only then), interleaved in a shuffled order every
round, MLP 784-256-256-10, batch 128, one thread; median time per step and ratio to SGD.

    .venv/bin/python benchmarks/saf_fused_term.py --rounds 200

An experiment, not part of samkit: samkit has no compiled code.
"""

from __future__ import annotations

import argparse
import copy
import random
import statistics
import time

import torch
from step_cost import NUM_EXAMPLES, SGD_KW, Batches, mlp
from torch import nn
from torch.autograd.function import once_differentiable
from torch.utils.cpp_extension import load_inline

import samkit
from samkit.optim.trajectory import trajectory_kl

F = nn.functional

KERNEL = r"""
#include <torch/extension.h>
#include <cmath>
#include <vector>

// SAF's term for n rows of C float32 logits z against the record rows[i] of memory (N x C):
// value = s t^2 / n sum_i KL(softmax(m_i / t) || softmax(z_i / t)), grad = s t (p - q) / n;
// then memory[rows[i]] = z_i.
std::vector<torch::Tensor> saf_term(torch::Tensor z, torch::Tensor memory, torch::Tensor rows,
                                    double temperature, double scale) {
  TORCH_CHECK(z.dtype() == torch::kFloat32 && memory.dtype() == torch::kFloat32, "float32 only");
  TORCH_CHECK(z.is_contiguous() && memory.is_contiguous(), "contiguous tensors only");
  const int64_t n = z.size(0), C = z.size(1);
  auto grad = torch::empty_like(z);
  const float* zp = z.data_ptr<float>();
  float* mp = memory.data_ptr<float>();
  const int64_t* rp = rows.data_ptr<int64_t>();
  float* gp = grad.data_ptr<float>();
  const float inv = static_cast<float>(1.0 / temperature);
  const float gscale = static_cast<float>(scale * temperature / n);
  std::vector<float> ea(C), eb(C);
  double kl = 0.0;
  for (int64_t i = 0; i < n; ++i) {
    const float* zi = zp + i * C;
    float* mi = mp + rp[i] * C;
    float ma = -INFINITY, mb = -INFINITY;
    for (int64_t c = 0; c < C; ++c) { ma = std::max(ma, zi[c]); mb = std::max(mb, mi[c]); }
    float sa = 0.f, sb = 0.f;
    for (int64_t c = 0; c < C; ++c) {
      ea[c] = std::exp((zi[c] - ma) * inv);
      eb[c] = std::exp((mi[c] - mb) * inv);
      sa += ea[c];
      sb += eb[c];
    }
    const float shift = std::log(sa) - std::log(sb), ra = 1.f / sa, rb = 1.f / sb;
    float row = 0.f;
    for (int64_t c = 0; c < C; ++c) {
      const float p = ea[c] * ra, q = eb[c] * rb;
      row += q * (((mi[c] - mb) - (zi[c] - ma)) * inv + shift);  // q (log q - log p)
      gp[i * C + c] = gscale * (p - q);
      mi[c] = zi[c];  // the record for lag epochs later
    }
    kl += row;
  }
  return {torch::scalar_tensor(kl * scale * temperature * temperature / n, z.options()), grad};
}
"""


def compile_kernel():
    return load_inline("samkit_saf_term_experiment", cpp_sources=KERNEL, functions=["saf_term"],
                       extra_cflags=["-O3"])


def fused_term_function(ext):
    class FusedTerm(torch.autograd.Function):
        @staticmethod
        def forward(ctx, output, memory, rows, temperature, scale):
            value, grad = ext.saf_term(output.detach(), memory, rows, temperature, scale)
            ctx.save_for_backward(grad)
            return value

        @staticmethod
        @once_differentiable
        def backward(ctx, grad_value):
            (grad,) = ctx.saved_tensors
            return grad * grad_value, None, None, None, None

    return FusedTerm


def fused_saf_class(term: type) -> type:
    class FusedSAF(samkit.SAF):
        """SAF whose term, once its memory is complete, is the fused kernel."""

        def _term(self, output, indices, epoch, num_examples):
            if self._slots is None or not all(self._complete):
                return super()._term(output, indices, epoch, num_examples)
            self._checked_epoch = epoch
            memory = self._slots[epoch % self.lag]
            return self._counted(term.apply(output, memory, indices, self.temperature, self.lam))

    return FusedSAF


def check(term: type) -> None:
    """The kernel against samkit's term (float32): value, gradient, record."""
    gen = torch.Generator().manual_seed(0)
    z = torch.randn(128, 10, generator=gen).mul_(4).requires_grad_()
    memory = torch.randn(1000, 10, generator=gen).mul_(4)
    rows = torch.randperm(1000, generator=gen)[:128]
    reference = memory[rows].clone()
    value = term.apply(z, memory, rows, 5.0, 6.0)
    value.backward()
    grad, z.grad = z.grad.clone(), None
    expected = trajectory_kl(z, reference, 5.0, None, 6.0)
    expected.backward()
    torch.testing.assert_close(value, expected, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(grad, z.grad, rtol=1e-5, atol=1e-7)
    assert torch.equal(memory[rows], z.detach()), "the record was not written"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=200, help="timed rounds of 3 steps (200)")
    args = ap.parse_args()
    term = fused_term_function(compile_kernel())
    check(term)
    torch.set_num_threads(1)
    torch.manual_seed(0)
    model = mlp([784, 256, 256, 10])
    x, y = torch.randn(128, 784), torch.randint(0, 10, (128,))

    m = copy.deepcopy(model)
    sgd = torch.optim.SGD(m.parameters(), **SGD_KW)

    def sgd_step(m=m, opt=sgd):
        opt.zero_grad()
        F.cross_entropy(m(x), y).backward()
        opt.step()

    def saf_step(cls):
        m = copy.deepcopy(model)
        opt = cls(torch.optim.SGD(m.parameters(), **SGD_KW), lam=6.0, start_epoch=-1,
                  num_examples=NUM_EXAMPLES)
        loader = Batches(NUM_EXAMPLES, len(y))

        def step():
            def closure():
                opt.zero_grad()
                out = m(x)
                loss = F.cross_entropy(out, y)
                (loss + opt.trajectory_loss(out, *loader.next())).backward()
                return loss

            opt.step(closure)

        for _ in range(8 * (NUM_EXAMPLES // len(y))):
            step()
        if not all(opt._complete):
            raise SystemExit("SAF's memory is not complete after 8 epochs")
        return step

    steps = {"SGD": sgd_step, "SAF": saf_step(samkit.SAF),
             "SAF, fused term": saf_step(fused_saf_class(term))}
    times: dict[str, list[float]] = {k: [] for k in steps}
    order = list(steps)
    rng = random.Random(0)
    for _ in range(args.rounds):
        rng.shuffle(order)
        for name in order:
            t0 = time.perf_counter()
            for _ in range(3):
                steps[name]()
            times[name].append((time.perf_counter() - t0) / 3)
    base = statistics.median(times["SGD"])
    print(f"torch {torch.__version__}; MLP 784-256-256-10, batch 128, 1 thread; median over "
          f"{args.rounds} interleaved rounds of 3 steps (the kernel matches trajectory_kl)\n")
    print("| method | time per step | vs SGD |\n|---|---|---|")
    for name, v in times.items():
        med = statistics.median(v)
        print(f"| {name} | {1e3 * med:.2f} ms | {med / base:.3f}× |")


if __name__ == "__main__":
    main()
