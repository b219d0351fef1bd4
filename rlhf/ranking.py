"""Rank policies from pairwise human votes, as Chatbot Arena does.

Raw win rates depend on who a policy happened to be paired with; a Bradley-Terry
fit puts every policy on one scale.  Its intervals come from the posterior the fit
already assumes (a Gaussian prior on each log-strength, see _L2_C), by the Laplace
approximation: the inverse Hessian of the penalised log-likelihood at the fit.  Unlike
a bootstrap, which resamples the votes and so gives one vote a zero-width interval, it
stays wide (about the prior) until votes narrow it, and it costs one fit instead of
hundreds.  Standings with fewer than PRELIMINARY_VOTES fitted votes are marked
preliminary.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass

import matplotlib
import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from scipy import stats
from sklearn.linear_model import LogisticRegression
from threadpoolctl import threadpool_limits

CHOICES = ("a", "b", "tie", "both_bad")
BASE_SCORE = 1000.0
_ELO_PER_NAT = 400.0 / math.log(10.0)
# Inverse L2 strength.  sklearn minimises C * sum(weight * log-loss) + ||beta||^2 / 2,
# i.e. a Gaussian prior with variance C on each log-strength: sd ~3.2 nats (~550
# points).  Negligible once a pair has tens of votes, yet an unbeaten policy stays finite.
_L2_C = 10.0
CONFIDENCE = 0.95
# Fewer fitted votes (wins, losses, ties) than this and a standing is preliminary.
PRELIMINARY_VOTES = 10


@dataclass(frozen=True)
class Comparison:
    model_a: int
    model_b: int
    choice: str

    def __post_init__(self) -> None:
        if self.choice not in CHOICES:
            raise ValueError(f"choice must be one of {CHOICES}, got {self.choice!r}")


@dataclass(frozen=True)
class Standing:
    model_id: int
    score: float
    ci_low: float
    ci_high: float
    votes: int
    wins: int
    losses: int
    ties: int
    both_bad: int
    preliminary: bool


class _Design:
    """Aggregated (a, b, outcome) rows of the fit and their logistic-regression design.

    Every row becomes two design rows, (+1 at a, -1 at b) labelled "a won" and labelled
    "b won", weighted by the row's count times the share of that outcome (a tie gives
    half to each).  Zero-weight rows stay in, so both classes are always present.
    """

    def __init__(self, comparisons: Sequence[Comparison], ids: list[int]) -> None:
        known = set(ids)
        rows = Counter((c.model_a, c.model_b, c.choice) for c in comparisons
                       if c.choice != "both_bad" and c.model_a != c.model_b
                       and c.model_a in known and c.model_b in known)
        self.counts = np.array(list(rows.values()), dtype=float)
        self.rated = sorted({m for a, b, _ in rows for m in (a, b)}, key=ids.index)
        column = {m: i for i, m in enumerate(self.rated)}
        x = np.zeros((len(rows), len(self.rated)))
        a_share = np.empty(len(rows))
        for r, (a, b, choice) in enumerate(rows):
            x[r, column[a]], x[r, column[b]] = 1.0, -1.0
            a_share[r] = {"a": 1.0, "b": 0.0, "tie": 0.5}[choice]
        self.x = np.vstack([x, x])
        self._labels = np.concatenate([np.ones(len(rows)), np.zeros(len(rows))])
        self._share = np.concatenate([a_share, 1.0 - a_share])
        self._model = LogisticRegression(C=_L2_C, fit_intercept=False, tol=1e-8, max_iter=1000)

    def fit(self) -> np.ndarray:
        """Log-strengths of ``self.rated``: the posterior mode under the Gaussian prior."""
        # The fit is tiny: BLAS threads only add synchronisation cost (5x slower on 2 cores).
        with threadpool_limits(limits=1, user_api="blas"):
            self._model.fit(self.x, self._labels, sample_weight=np.tile(self.counts, 2) * self._share)
        return self._model.coef_[0]

    def centred_sd(self, beta: np.ndarray) -> np.ndarray:
        """Posterior sd of each centred log-strength (beta_i - mean beta), Laplace approximation.

        The penalised log-likelihood's Hessian at beta is X' diag(n p (1 - p)) X + I / C
        over the aggregated rows (the two design rows of a row weigh n in all); its inverse
        is the posterior covariance, projected onto the centred scores.
        """
        x = self.x[: len(self.counts)]
        p = 1.0 / (1.0 + np.exp(-x @ beta))
        hessian = x.T @ (x * (self.counts * p * (1 - p))[:, None]) + np.eye(len(beta)) / _L2_C
        centre = np.eye(len(beta)) - 1.0 / len(beta)
        covariance = centre @ np.linalg.inv(hessian) @ centre.T
        return np.sqrt(np.clip(np.diag(covariance), 0.0, None))


def _scores(beta: np.ndarray) -> np.ndarray:
    """Log-strengths on the Elo-like scale, centred on BASE_SCORE."""
    return BASE_SCORE + _ELO_PER_NAT * (beta - beta.mean())


def _unique(model_ids: Sequence[int]) -> list[int]:
    return list(dict.fromkeys(model_ids))


def fit_bradley_terry(comparisons: Sequence[Comparison], model_ids: Sequence[int]) -> dict[int, float]:
    """Bradley-Terry score per policy: 1000 + 400*log10(strength), policies' mean at 1000.

    Weighted L2-penalised logistic regression on the pairwise design, ties as half a win
    for each side; ``both_bad`` votes, self-pairs and policies outside ``model_ids`` are
    ignored.  A policy without usable comparisons scores exactly 1000.
    """
    ids = _unique(model_ids)
    scores = dict.fromkeys(ids, BASE_SCORE)
    design = _Design(comparisons, ids)
    if design.rated:
        scores.update(zip(design.rated, _scores(design.fit()).tolist()))
    return scores


def _tallies(comparisons: Sequence[Comparison], ids: list[int]) -> dict[int, Counter]:
    tallies = {m: Counter() for m in ids}
    for c in comparisons:
        if c.model_a == c.model_b or c.model_a not in tallies or c.model_b not in tallies:
            continue
        for me, side in ((c.model_a, "a"), (c.model_b, "b")):
            if c.choice in ("tie", "both_bad"):
                tallies[me][c.choice] += 1
            else:
                tallies[me]["wins" if c.choice == side else "losses"] += 1
    return tallies


def leaderboard(comparisons: Sequence[Comparison], model_ids: Sequence[int]) -> list[Standing]:
    """Standings sorted by score, best first, with 95% posterior intervals (Laplace).

    A policy without usable comparisons gets score 1000 and the degenerate interval
    (1000, 1000); ``votes == 0`` (or only ``both_bad`` votes) tells it apart from a
    measured 1000.  Counts cover every vote, ``both_bad`` included; ``preliminary``
    counts only the fitted ones.
    """
    ids = _unique(model_ids)
    design = _Design(comparisons, ids)
    scores = dict.fromkeys(ids, BASE_SCORE)
    low, high = dict(scores), dict(scores)
    if design.rated:
        beta = design.fit()
        half = stats.norm.ppf(0.5 + CONFIDENCE / 2) * _ELO_PER_NAT * design.centred_sd(beta)
        rated = _scores(beta)
        scores.update(zip(design.rated, rated.tolist()))
        low.update(zip(design.rated, (rated - half).tolist()))
        high.update(zip(design.rated, (rated + half).tolist()))
    tallies = _tallies(comparisons, ids)
    standings = [
        Standing(model_id=m, score=scores[m], ci_low=low[m], ci_high=high[m],
                 votes=sum(tallies[m].values()), wins=tallies[m]["wins"],
                 losses=tallies[m]["losses"], ties=tallies[m]["tie"],
                 both_bad=tallies[m]["both_bad"],
                 preliminary=tallies[m]["wins"] + tallies[m]["losses"] + tallies[m]["tie"] < PRELIMINARY_VOTES)
        for m in ids
    ]
    return sorted(standings, key=lambda s: -s.score)


def win_rate_matrix(comparisons: Sequence[Comparison], model_ids: Sequence[int]) -> np.ndarray:
    """``[i, j]``: share of i's wins against j in either seat, ties as half, ``both_bad`` excluded.

    NaN where i and j have no such comparison, and on the diagonal.
    """
    ids = _unique(model_ids)
    index = {m: i for i, m in enumerate(ids)}
    points = np.zeros((len(ids), len(ids)))
    games = np.zeros((len(ids), len(ids)))
    for c in comparisons:
        i, j = index.get(c.model_a), index.get(c.model_b)
        if i is None or j is None or i == j or c.choice == "both_bad":
            continue
        a_points = {"a": 1.0, "b": 0.0, "tie": 0.5}[c.choice]
        points[i, j] += a_points
        points[j, i] += 1.0 - a_points
        games[i, j] += 1
        games[j, i] += 1
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(games > 0, points / games, np.nan)


def heatmap_figure(matrix: np.ndarray, labels: Sequence[str]) -> Figure:
    """Annotated heatmap of a win-rate matrix: rows are the policy, columns its opponent.

    Built on a bare Agg canvas (no pyplot, no display); NaN cells stay blank.
    """
    matrix = np.asarray(matrix, dtype=float)
    if matrix.shape != (len(labels), len(labels)):
        raise ValueError(f"matrix shape {matrix.shape} does not match {len(labels)} labels")
    side = max(4.0, 1.0 + 0.9 * len(labels))
    fig = Figure(figsize=(side + 1.5, side), layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    if len(labels) == 0:
        ax.text(0.5, 0.5, "No policies to compare", ha="center", va="center")
        ax.set_axis_off()
        return fig
    cmap = matplotlib.colormaps["RdYlGn"].with_extremes(bad="white")
    image = ax.imshow(np.ma.masked_invalid(matrix), cmap=cmap, vmin=0.0, vmax=1.0)
    for (i, j), value in np.ndenumerate(matrix):
        if not np.isnan(value):
            ax.text(j, i, f"{value:.2f}", ha="center", va="center",
                    color="white" if abs(value - 0.5) > 0.35 else "black")
    ticks = np.arange(len(labels))
    ax.set_xticks(ticks, labels, rotation=45, ha="right", rotation_mode="anchor")
    ax.set_yticks(ticks, labels)
    ax.set_xlabel("opponent")
    ax.set_ylabel("policy")
    ax.set_title("Win rate of row policy against column policy")
    fig.colorbar(image, ax=ax, label="win rate (ties count half)")
    return fig
