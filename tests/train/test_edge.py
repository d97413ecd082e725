"""EdgeTracker: exact λ₁ and alignments on a linear model with MSE, the edge per optimizer,
warm starts, JSONL rows, and the trainer callback."""

import json
import math

import pytest
import torch
from torch import nn

import samkit
from samkit.stability import adam_edge, gd_edge, momentum_edge, sam_edge, usam_edge
from samkit.train.edge import EdgeTracker, edge_for, optimizer_kind, read_edge_rows


def mse(out, y):
    return ((out - y) ** 2).sum(-1).mean()


def linear_problem(n=64, d=6, k=1, seed=0):
    """A linear model f(x) = W x with MSE: H = (2/N) Xᵀ X ⊗ I_k, known in closed form (k = 1:
    a simple top eigenvalue, so v₁ is unique up to sign)."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=gen, dtype=torch.float64)
    x = x * torch.linspace(0.5, 2.0, d, dtype=torch.float64)  # a clear top eigenvalue
    y = torch.randn(n, k, generator=gen, dtype=torch.float64)
    model = nn.Linear(d, k, bias=False).double()
    with torch.no_grad():
        model.weight.copy_(torch.randn(k, d, generator=gen, dtype=torch.float64))
    return model, x, y


def dense(model, x, y):
    """Exact gradient, Hessian and top eigenpair (float64) of the linear problem."""
    (w,) = list(model.parameters())

    def loss_of(flat):
        return mse(x @ flat.view_as(w).T, y)

    flat = w.detach().reshape(-1).clone()
    g = torch.func.grad(loss_of)(flat)
    H = torch.func.hessian(loss_of)(flat)
    vals, vecs = torch.linalg.eigh(H)
    return g, H, vals[-1].item(), vecs[:, -1]


def sgd(model, **kw):
    return torch.optim.SGD(model.parameters(), **kw)


def test_exact_lambda_gradient_and_alignments():
    model, x, y = linear_problem()
    g, H, lam, v = dense(model, x, y)
    rho = 0.1
    tracker = EdgeTracker((x, y), mse, every=1, budget=None, rho=rho, tol=1e-8)
    row = tracker.record(0, model, sgd(model, lr=0.01))
    assert row["lambda1"] == pytest.approx(lam, rel=1e-7)
    assert row["grad_norm"] == pytest.approx(g.norm().item(), rel=1e-10)
    assert row["loss"] == pytest.approx(mse(model(x), y).item(), rel=1e-12)
    assert row["align_grad"] == pytest.approx(abs(g @ v).item() / g.norm().item(), rel=1e-6)
    g_sam = g + H @ (rho * g / g.norm())  # the gradient at w + rho g/|g| of a quadratic
    expect = abs(g_sam @ v).item() / g_sam.norm().item()
    assert row["align_sam_grad"] == pytest.approx(expect, rel=1e-6)
    # the GD edge and the ratio
    assert row["edge"] == pytest.approx(gd_edge(0.01)) and row["edge_kind"] == "gd"
    assert row["ratio"] == pytest.approx(lam / 200.0, rel=1e-7)
    assert row["gd_edge"] == pytest.approx(200.0)
    # the weights and their .grad are untouched
    assert model.weight.grad is None


def test_sam_gradient_aligns_more_than_the_gradient():
    """On a quadratic the SAM gradient g + ρHg/‖g‖ tilts towards v₁ (Long & Bartlett)."""
    model, x, y = linear_problem(seed=3)
    row = EdgeTracker((x, y), mse, rho=1.0, tol=1e-8).record(0, model, sgd(model, lr=0.01))
    assert row["align_sam_grad"] > row["align_grad"]


def test_warm_start_rows_are_exact_and_counted():
    model, x, y = linear_problem(d=20)
    tracker = EdgeTracker((x, y), mse, every=1, budget=None, tol=1e-6)
    opt = sgd(model, lr=0.001)
    first = tracker.record(0, model, opt)
    with torch.no_grad():
        model.weight.mul_(1.001)  # H does not depend on w: v₁ stays exact
    second = tracker.record(1, model, opt)
    assert second["lambda1"] == pytest.approx(first["lambda1"], rel=1e-6)
    assert first["converged"] and second["converged"]
    assert second["error_bound"] <= 1e-6 * second["lambda1"]
    assert tracker.matvecs == first["matvecs"] + second["matvecs"]
    assert tracker.cost()["rows"] == 2 and tracker.seconds > 0
    assert "2 measurements" in tracker.cost_summary()


def test_a_crossing_of_the_top_eigenvalues_is_seen():
    """Warm-started from v₁, the tracker must still find λ₁ when the old v₁ has become the
    eigenvector of λ₂ (the lock-on of issue 11)."""
    gen = torch.Generator().manual_seed(0)
    n, d = 200, 30
    basis, _ = torch.linalg.qr(torch.randn(d, d, generator=gen, dtype=torch.float64))
    scales = torch.linspace(0.2, 1.0, d, dtype=torch.float64)
    scales[-1], scales[-2] = 2.0, 1.9
    z, _ = torch.linalg.qr(torch.randn(n, d, generator=gen, dtype=torch.float64))
    x = z * scales @ basis.T  # H = (2/n) B diag(scales²) Bᵀ exactly
    y = torch.randn(n, 1, generator=gen, dtype=torch.float64)
    model = nn.Linear(d, 1, bias=False).double()
    tracker = EdgeTracker((x, y), mse, every=1, budget=None, tol=1e-8)
    opt = sgd(model, lr=0.001)
    tracker.record(0, model, opt)
    # swap the two top directions: the old v₁ is now exactly the eigenvector of λ₂
    scales[-1], scales[-2] = 1.9, 2.2
    x2 = z * scales @ basis.T
    tracker.probe = [(x2, y)]
    row = tracker.record(1, model, opt)
    _, _, lam, _ = dense(model, x2, y)
    assert row["converged"]
    assert row["lambda1"] == pytest.approx(lam, rel=1e-8)


def _tiny_mlp_problem(seed=0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(64, 4, generator=gen, dtype=torch.float64)
    y = torch.randint(0, 3, (64,), generator=gen)
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3)).double()
    return model, x, y


def _dense_top(model, loss_fn, x, y, k):
    names = [n for n, _ in model.named_parameters()]
    params = [p.detach() for p in model.parameters()]
    shapes = [p.shape for p in params]
    sizes = [p.numel() for p in params]

    def loss_of(flat):
        ps = [t.view(s) for t, s in zip(torch.split(flat, sizes), shapes, strict=True)]
        out = torch.func.functional_call(model, dict(zip(names, ps, strict=True)), (x,))
        return loss_fn(out, y)

    flat = torch.cat([p.reshape(-1) for p in params])
    return torch.linalg.eigvalsh(torch.func.hessian(loss_of)(flat)).flip(0)[:k]


@pytest.mark.parametrize("k", [1, 3])
def test_tracked_sam_run_matches_a_cold_dense_reference_at_every_row(k):
    """A short SAM run: every recorded λ₁ (and the top k) equals the eigenvalues of the dense
    float64 Hessian at the same weights, and every row is converged."""
    model, x, y = _tiny_mlp_problem()
    ce = nn.CrossEntropyLoss()
    tol = 1e-8
    tracker = EdgeTracker((x, y), ce, every=1, budget=None, tol=tol, k=k)
    opt = samkit.SAM(torch.optim.SGD(model.parameters(), lr=0.5), rho=0.1)
    for step in range(25):
        if tracker.due(step):
            row = tracker.record(step, model, opt)
            ref = _dense_top(model, ce, x, y, k)
            assert row["converged"], row
            assert row["lambda1"] == pytest.approx(float(ref[0]), rel=10 * tol), step
            if k > 1:
                torch.testing.assert_close(
                    torch.tensor(row["eigenvalues"], dtype=torch.float64), ref, rtol=10 * tol,
                    atol=1e-12,
                )

        def closure():
            opt.zero_grad()
            loss = ce(model(x), y)
            loss.backward()
            return loss

        opt.step(closure)


@pytest.mark.parametrize(
    "make, expect, kind",
    [
        (lambda m: sgd(m, lr=0.02), lambda g: gd_edge(0.02), "gd"),
        (lambda m: sgd(m, lr=0.02, momentum=0.9), lambda g: momentum_edge(0.02, 0.9), "momentum"),
        (
            lambda m: sgd(m, lr=0.02, momentum=0.5, nesterov=True),
            lambda g: momentum_edge(0.02, 0.5, nesterov=True),
            "nesterov",
        ),
        (lambda m: samkit.SAM(sgd(m, lr=0.02), rho=0.05), lambda g: sam_edge(0.02, 0.05, g),
         "sam+gd"),
        (lambda m: samkit.USAM(sgd(m, lr=0.02), rho=0.05), lambda g: usam_edge(0.02, 0.05),
         "usam+gd"),
    ],
)
def test_edge_per_optimizer(make, expect, kind):
    model, x, y = linear_problem()
    opt = make(model)
    row = EdgeTracker((x, y), mse, tol=1e-8).record(0, model, opt)
    assert row["edge_kind"] == kind
    assert row["edge"] == pytest.approx(expect(row["grad_norm"]), rel=1e-12)
    assert row["ratio"] == pytest.approx(row["lambda1"] / row["edge"], rel=1e-12)
    assert (row["align_sam_grad"] is not None) == kind.startswith(("sam", "usam"))


def test_sam_over_momentum_solves_the_effective_edge():
    """SAM over heavy ball: λ(1 + ρλ/‖g‖) equals the momentum edge at the returned λ."""
    model, _, _ = linear_problem()
    opt = samkit.SAM(sgd(model, lr=0.05, momentum=0.9), rho=0.1)
    lam = edge_for(opt, 0.3)
    assert lam * (1 + 0.1 * lam / 0.3) == pytest.approx(momentum_edge(0.05, 0.9), rel=1e-12)
    assert lam < momentum_edge(0.05, 0.9)
    # and it reduces to the paper's SAM-edge without momentum
    assert edge_for(samkit.SAM(sgd(model, lr=0.05), rho=0.1), 0.3) == pytest.approx(
        sam_edge(0.05, 0.1, 0.3), rel=1e-12
    )


def test_no_edge_where_none_applies():
    model, x, y = linear_problem()
    asam = samkit.ASAM(sgd(model, lr=0.02), rho=0.5)
    assert edge_for(asam, 1.0) is None and "ASAM" in optimizer_kind(asam).note
    row = EdgeTracker((x, y), mse).record(0, model, asam)
    assert row["edge"] is None and row["ratio"] is None and row["edge_kind"] == "none"
    groups = [{"params": [model.weight], "lr": 0.1}]
    assert edge_for(torch.optim.RMSprop(groups), 1.0) is None
    assert edge_for(sgd(model, lr=0.1, momentum=0.9, dampening=0.1), 1.0) is None
    with pytest.raises(ValueError, match="grad_norm"):
        edge_for(samkit.SAM(sgd(model, lr=0.1), rho=0.1))


def test_adam_edge_selection():
    model, _, _ = linear_problem()
    opt = torch.optim.Adam(model.parameters(), lr=1e-3, betas=(0.9, 0.999))
    assert optimizer_kind(opt).base.rule.value == "adam"
    assert edge_for(opt) == pytest.approx(adam_edge(1e-3, 0.9))


def test_adam_preconditioned_sharpness():
    curvature = pytest.importorskip("samkit.curvature")
    if not hasattr(curvature, "adam_preconditioned"):
        pytest.skip("samkit.curvature.adam_preconditioned has not landed")
    model, x, y = linear_problem()
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    for _ in range(3):
        opt.zero_grad()
        mse(model(x), y).backward()
        opt.step()
    fresh = torch.optim.Adam(model.parameters(), lr=1e-3)  # no state yet: no preconditioner
    before = EdgeTracker((x, y), mse).record(0, model, fresh)
    assert before["lambda1_precond"] is None and before["ratio"] is None
    assert before["edge"] == pytest.approx(adam_edge(1e-3, 0.9))
    row = EdgeTracker((x, y), mse, tol=1e-8).record(3, model, opt)
    _, H, _, _ = dense(model, x, y)
    (state,) = opt.state.values()
    v_hat = state["exp_avg_sq"] / (1 - 0.999 ** float(state["step"]))
    p_inv_sqrt = (v_hat.sqrt() + 1e-8).reshape(-1) ** -0.5
    expect = torch.linalg.eigvalsh(p_inv_sqrt[:, None] * H * p_inv_sqrt[None, :])[-1].item()
    assert row["lambda1_precond"] == pytest.approx(expect, rel=1e-5)
    assert row["ratio"] == pytest.approx(expect / adam_edge(1e-3, 0.9), rel=1e-5)


def test_batch_gradient_norm_sets_the_sam_edge():
    model, x, y = linear_problem()
    opt = samkit.SAM(sgd(model, lr=0.02), rho=0.05)
    row = EdgeTracker((x, y), mse).record(0, model, opt, batch=(x[:8], y[:8]))
    g8 = dense(model, x[:8], y[:8])[0].norm().item()
    assert row["batch_grad_norm"] == pytest.approx(g8, rel=1e-10)
    assert row["edge"] == pytest.approx(sam_edge(0.02, 0.05, g8), rel=1e-12)


def test_list_of_batches_is_the_weighted_mean():
    model, x, y = linear_problem(n=50)
    whole = EdgeTracker((x, y), mse, tol=1e-8).record(0, model, sgd(model, lr=0.1))
    chunks = [(x[:20], y[:20]), (x[20:], y[20:])]
    parts = EdgeTracker(chunks, mse, tol=1e-8).record(0, model, sgd(model, lr=0.1))
    for key in ("loss", "grad_norm", "lambda1", "align_grad"):
        assert parts[key] == pytest.approx(whole[key], rel=1e-6)


def test_maybe_record_every_k_and_jsonl(tmp_path):
    model, x, y = linear_problem()
    path = tmp_path / "edge.jsonl"
    path.write_text("stale\n")
    tracker = EdgeTracker((x, y), mse, every=3, budget=None, path=path)
    opt = samkit.SAM(sgd(model, lr=0.01), rho=0.05)
    for t in range(7):
        tracker.maybe_record(t, model, opt)

        def closure():
            opt.zero_grad()
            loss = mse(model(x), y)
            loss.backward()
            return loss

        opt.step(closure)
    rows = read_edge_rows(path)
    assert [r["step"] for r in rows] == [0, 3, 6] == [r["step"] for r in tracker.rows]
    assert json.loads(path.read_text().splitlines()[0])["step"] == 0
    for r in rows:
        for key in ("loss", "grad_norm", "lambda1", "edge", "ratio", "align_grad",
                    "align_sam_grad", "matvecs", "seconds", "gd_edge", "lr", "rho"):
            assert key in r and r[key] is not None
            assert not isinstance(r[key], float) or math.isfinite(r[key])


def test_diverged_weights_give_a_row_without_eigenvalues():
    model, x, y = linear_problem()
    with torch.no_grad():
        model.weight.fill_(float("inf"))
    row = EdgeTracker((x, y), mse).record(5, model, sgd(model, lr=0.1))
    assert row["diverged"] and row["step"] == 5 and "lambda1" not in row


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"every": 0}, "Invalid every"),
        ({"rho": -1.0}, "Invalid rho"),
        ({"tol": 0}, "Invalid tol"),
        ({"max_iter": 0}, "Invalid max_iter"),
        ({"k": 0}, "Invalid k"),
        ({"preconditioned": "yes"}, "Invalid preconditioned"),
    ],
)
def test_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        EdgeTracker(**kwargs)


def test_needs_a_probe_outside_a_trainer():
    model, _, _ = linear_problem()
    with pytest.raises(ValueError, match="probe"):
        EdgeTracker().record(0, model, sgd(model, lr=0.1))
    with pytest.raises(ValueError, match="Invalid probe"):
        EdgeTracker(probe="data.csv")


def test_trainer_callback(tmp_path):
    from samkit.train import TrainConfig, Trainer

    cfg = TrainConfig(
        dataset="synthetic", subset=128, model="mlp", model_kwargs={"width": 16, "depth": 1},
        optimizer="sam", rho=0.05, lr=0.05, momentum=0.0, batch_size=0, steps=4,
        schedule="constant",
        out_dir=str(tmp_path), name="edge", checkpoint=False,
    )
    tracker = EdgeTracker(every=2, budget=None)
    Trainer(cfg, callbacks=[tracker], verbose=0).fit()
    rows = read_edge_rows(tmp_path / "edge")
    assert [r["step"] for r in rows] == [0, 2, 4]
    assert rows[0]["edge_kind"] == "sam+gd"
    assert rows[-1]["edge"] == pytest.approx(sam_edge(0.05, 0.05, rows[-1]["grad_norm"]))


def test_trainer_resume_keeps_rows_and_warm_start(tmp_path):
    from samkit.train import TrainConfig, Trainer

    common = dict(
        dataset="synthetic", subset=64, model="mlp", model_kwargs={"width": 8, "depth": 1},
        optimizer="sgd", lr=0.05, momentum=0.0, batch_size=0, schedule="constant",
        out_dir=str(tmp_path), name="edge", checkpoint=True,
    )
    first = EdgeTracker(every=2, budget=None)
    Trainer(TrainConfig(steps=4, **common), callbacks=[first], verbose=0).fit()
    second = EdgeTracker(every=2, budget=None)
    trainer = Trainer(TrainConfig(steps=6, **common), callbacks=[second], resume=True, verbose=0)
    trainer.fit()
    rows = read_edge_rows(tmp_path / "edge" / "edge.jsonl")
    assert [r["step"] for r in rows] == [0, 2, 4, 6]
    assert second.matvecs > first.matvecs  # the cost carries over from the checkpoint
    assert rows[-1]["edge"] == pytest.approx(gd_edge(0.05))


# ------------------------------------------------------------------ the effective Hessian


def _asam_dense_heff(model, x, y, rho, eta):
    g, H, _, _ = dense(model, x, y)
    (w,) = list(model.parameters())
    t = w.detach().abs().reshape(-1) + eta
    D = rho * t * t / float((t * g).norm())
    return H + H @ torch.diag(D) @ H


def test_effective_hessian_rows_for_asam_sam_and_sgd():
    model, x, y = linear_problem()
    g, H, lam, _ = dense(model, x, y)
    tracker = EdgeTracker((x, y), mse, every=1, budget=None, tol=1e-9, max_iter=200)
    lr = 0.01
    asam = samkit.ASAM(sgd(model, lr=lr, momentum=0.9), rho=0.5, eta=0.01)
    row = tracker.record(0, model, asam)
    lam_eff = float(torch.linalg.eigvalsh(_asam_dense_heff(model, x, y, 0.5, 0.01))[-1])
    assert row["edge"] is None  # no closed form for ASAM ...
    assert row["lambda_eff"] == pytest.approx(lam_eff, rel=1e-7)  # ... but an effective one
    assert row["base_edge"] == pytest.approx(momentum_edge(lr, 0.9))
    assert row["eff_ratio"] == pytest.approx(lam_eff / momentum_edge(lr, 0.9), rel=1e-7)
    sam_row = EdgeTracker((x, y), mse, every=1, tol=1e-9).record(
        0, model, samkit.SAM(sgd(model, lr=lr), rho=0.1)
    )
    a = 0.1 / g.norm().item()
    assert sam_row["lambda_eff"] == pytest.approx(lam + a * lam**2, rel=1e-7)
    assert sam_row["base_edge"] == pytest.approx(gd_edge(lr))
    # at the edge both ratios cross 1 together: lambda_eff < 2/lr iff lambda1 < SAM-edge
    assert (sam_row["eff_ratio"] < 1) == (sam_row["ratio"] < 1)
    plain = EdgeTracker((x, y), mse, every=1).record(0, model, sgd(model, lr=lr))
    assert plain["lambda_eff"] is None and plain["eff_ratio"] is None
    assert plain["base_edge"] == pytest.approx(gd_edge(lr))
    off = EdgeTracker((x, y), mse, every=1, effective=False).record(0, model, asam)
    assert off["lambda_eff"] is None and off["matvecs"] < row["matvecs"]


# --------------------------------------------------------------------------- the time budget


class _Clock:
    def __init__(self):
        self.now = 0.0

    def __call__(self):
        return self.now


def _budgeted_run(monkeypatch, budget, steps=200, step_cost=1.0, measure_cost=2.0, every=1):
    """A plain loop on a fake clock: each step costs ``step_cost`` seconds, each measurement
    ``measure_cost`` (the tracker's own accounting, ``_append``, reads the same clock)."""
    import samkit.train.edge as edge_module

    clock = _Clock()
    monkeypatch.setattr(edge_module.time, "perf_counter", clock)

    def record(self, step, model, optimizer, batch=None, probe=None):
        start = clock()
        clock.now += measure_cost
        return self._append({"step": int(step)}, start, 10)

    monkeypatch.setattr(EdgeTracker, "record", record)
    tracker = EdgeTracker((torch.zeros(2, 1), torch.zeros(2, 1)), mse, every=every,
                          budget=budget)
    for t in range(steps):
        tracker.maybe_record(t, None, None)
        clock.now += step_cost
    return tracker, clock


def test_budget_keeps_the_tracker_within_its_share_of_the_run(monkeypatch):
    """2 s measurements against 1 s steps with a 25 % budget: each measurement is followed by
    2 * 0.75 / 0.25 = 6 s of training, and the share never exceeds 25 %: the forced one at
    step 0 is paid back first (the next at step 12), then one every 6 steps."""
    tracker, clock = _budgeted_run(monkeypatch, budget=0.25)
    cost = tracker.cost()
    assert cost["share"] <= 0.25 + 1e-12  # at the end of the run too
    assert cost["share"] == pytest.approx(tracker.seconds / clock.now)
    steps = [r["step"] for r in tracker.rows]
    assert steps == [0, *range(12, 200, 6)]
    assert cost["skipped"] == 200 - cost["rows"]
    assert "left out to stay within 25 %" in tracker.cost_summary()


def test_budget_estimates_a_measurement_by_the_costliest_of_the_last_three(monkeypatch):
    """Measurements of varying cost are still kept within the budget at every point."""
    import samkit.train.edge as edge_module

    clock = _Clock()
    monkeypatch.setattr(edge_module.time, "perf_counter", clock)
    costs = iter([1.0, 1.0, 3.0, 1.0, 1.0, 1.0] * 20)

    def record(self, step, model, optimizer, batch=None, probe=None):
        start = clock()
        clock.now += next(costs)
        return self._append({"step": int(step)}, start, 10)

    monkeypatch.setattr(EdgeTracker, "record", record)
    tracker = EdgeTracker((torch.zeros(2, 1), torch.zeros(2, 1)), mse, every=1, budget=0.25)
    shares = []
    for t in range(300):
        tracker.maybe_record(t, None, None)
        clock.now += 1.0
        shares.append(tracker.seconds / clock.now)
    assert max(shares[20:]) <= 0.25 + 1e-12
    assert len(tracker.rows) > 10


def test_no_budget_measures_every_due_step(monkeypatch):
    tracker, _ = _budgeted_run(monkeypatch, budget=None, steps=30, every=3)
    assert [r["step"] for r in tracker.rows] == list(range(0, 30, 3))
    assert tracker.skipped == 0 and "left out" not in tracker.cost_summary()


def test_cheap_measurements_are_all_taken_within_the_budget(monkeypatch):
    tracker, _ = _budgeted_run(monkeypatch, budget=0.25, steps=50, every=5, measure_cost=0.5)
    assert [r["step"] for r in tracker.rows] == list(range(0, 50, 5))  # 0.5 s per 5 s
    assert tracker.skipped == 0


def test_budget_clock_survives_a_resume(monkeypatch):
    tracker, clock = _budgeted_run(monkeypatch, budget=0.25, steps=100)
    state = tracker.state_dict()
    again = EdgeTracker((torch.zeros(2, 1), torch.zeros(2, 1)), mse, every=1, budget=0.25)
    again.load_state_dict(state)
    assert again.seconds == tracker.seconds and again.skipped == tracker.skipped
    assert again.elapsed() == pytest.approx(tracker.elapsed())  # not restarted at zero
    assert again.should_measure(200)  # the first due step after a resume is measured


@pytest.mark.parametrize("budget", [0, -0.1, 1.5, True, "0.2"])
def test_invalid_budget(budget):
    with pytest.raises(ValueError, match="Invalid budget"):
        EdgeTracker(budget=budget)


def test_sam_rows_take_lambda_eff_from_lambda1s_krylov_space():
    """SAM's λ_max(H_eff) costs one product more than λ₁ alone (not a second Lanczos run), and
    is exact against the closed form λ₁ + (ρ/‖g‖)λ₁²; ASAM still runs Lanczos on H_eff."""
    model, x, y = linear_problem(n=64, d=6, k=3)
    lr = 0.01
    sam = samkit.SAM(sgd(model, lr=lr), rho=0.1)
    with_eff = EdgeTracker((x, y), mse, tol=1e-9).record(0, model, sam)
    without = EdgeTracker((x, y), mse, tol=1e-9, effective=False).record(0, model, sam)
    g, _, lam, _ = dense(model, x, y)
    a = 0.1 / g.norm().item()
    assert with_eff["lambda_eff"] == pytest.approx(lam + a * lam**2, rel=1e-8)
    assert with_eff["converged"]
    assert with_eff["matvecs"] == without["matvecs"] + 1
    asam = samkit.ASAM(sgd(model, lr=lr), rho=0.5, eta=0.01)
    asam_row = EdgeTracker((x, y), mse, tol=1e-9).record(0, model, asam)
    asam_plain = EdgeTracker((x, y), mse, tol=1e-9, effective=False).record(0, model, asam)
    assert asam_row["matvecs"] > asam_plain["matvecs"] + 1


def test_a_step_asked_twice_is_left_out_once(monkeypatch):
    tracker, _ = _budgeted_run(monkeypatch, budget=0.25, steps=3)
    before = tracker.skipped
    assert not tracker.should_measure(3) and not tracker.should_measure(3)
    assert tracker.skipped == before + 1


def test_a_row_without_a_ratio_prints():
    """Adam before its preconditioner exists: an edge, no ratio (a verbose tracker printed it)."""
    from samkit.train.edge import format_row

    row = {"step": 0, "loss": 1.0, "grad_norm": 0.5, "lambda1": 3.0, "edge": 40.0,
           "edge_kind": "adam", "ratio": None, "align_grad": 0.1, "matvecs": 20, "seconds": 0.1}
    line = format_row(row)
    assert "edge 40.000 (adam)" in line and "ratio" not in line
