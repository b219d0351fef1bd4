import math

import numpy as np
import pytest
from matplotlib.figure import Figure

from rlhf.ranking import PRELIMINARY_VOTES, Comparison, fit_bradley_terry, heatmap_figure, leaderboard, win_rate_matrix

STRENGTHS = {10: 1.0, 11: 2.0, 12: 4.0, 13: 8.0}


def synthetic(n: int, seed: int = 0, strengths: dict[int, float] = STRENGTHS) -> list[Comparison]:
    """Votes drawn from a Bradley-Terry model with the given strengths, random seats."""
    rng = np.random.default_rng(seed)
    ids = np.array(list(strengths))
    power = np.array(list(strengths.values()))
    a = rng.integers(len(ids), size=n)
    b = (a + rng.integers(1, len(ids), size=n)) % len(ids)
    a_wins = rng.random(n) < power[a] / (power[a] + power[b])
    return [Comparison(int(ids[i]), int(ids[j]), "a" if won else "b") for i, j, won in zip(a, b, a_wins)]


def test_recovers_order_and_elo_gaps_of_known_strengths():
    scores = fit_bradley_terry(synthetic(6000), list(STRENGTHS))
    assert sorted(scores, key=scores.get) == [10, 11, 12, 13]
    for low, high in [(10, 11), (11, 12), (12, 13), (10, 13)]:
        expected = 400 * math.log10(STRENGTHS[high] / STRENGTHS[low])
        assert scores[high] - scores[low] == pytest.approx(expected, abs=25)


def test_scores_are_anchored_at_mean_1000():
    scores = fit_bradley_terry(synthetic(500), list(STRENGTHS))
    assert np.mean(list(scores.values())) == pytest.approx(1000)


def test_only_ties_give_equal_scores():
    scores = fit_bradley_terry([Comparison(1, 2, "tie")] * 5 + [Comparison(2, 1, "tie")] * 3, [1, 2])
    assert scores[1] == pytest.approx(scores[2]) == pytest.approx(1000)


def test_a_tie_counts_as_half_a_win():
    scores = fit_bradley_terry([Comparison(1, 2, "a"), Comparison(1, 2, "tie")], [1, 2])
    assert scores[1] > scores[2]
    # Two wins and two ties weigh the same as three wins against one loss.
    halves = fit_bradley_terry([Comparison(1, 2, "a")] * 2 + [Comparison(2, 1, "tie")] * 2, [1, 2])
    wins = fit_bradley_terry([Comparison(1, 2, "a")] * 3 + [Comparison(2, 1, "a")], [1, 2])
    assert halves[1] == pytest.approx(wins[1], abs=1e-3)


def test_unbeaten_policy_gets_finite_score():
    scores = fit_bradley_terry([Comparison(1, 2, "a")] * 50, [1, 2])
    assert all(math.isfinite(s) for s in scores.values())
    assert scores[1] > scores[2]


def test_both_bad_is_counted_but_not_fitted():
    base = [Comparison(1, 2, "a"), Comparison(2, 1, "b"), Comparison(2, 1, "a"), Comparison(1, 3, "tie")]
    with_bad = base + [Comparison(1, 2, "both_bad")] * 7 + [Comparison(3, 2, "both_bad")]
    assert fit_bradley_terry(with_bad, [1, 2, 3]) == pytest.approx(fit_bradley_terry(base, [1, 2, 3]))

    board = {s.model_id: s for s in leaderboard(with_bad, [1, 2, 3])}
    assert (board[1].votes, board[1].wins, board[1].losses, board[1].ties, board[1].both_bad) == (11, 2, 1, 1, 7)
    assert (board[2].votes, board[2].wins, board[2].losses, board[2].ties, board[2].both_bad) == (11, 1, 2, 0, 8)
    assert (board[3].votes, board[3].wins, board[3].losses, board[3].ties, board[3].both_bad) == (2, 0, 0, 1, 1)


def test_only_both_bad_votes_leave_everyone_at_1000():
    board = leaderboard([Comparison(1, 2, "both_bad")] * 4, [1, 2])
    assert [(s.score, s.ci_low, s.ci_high, s.both_bad, s.votes) for s in board] == [(1000, 1000, 1000, 4, 4)] * 2


@pytest.mark.parametrize("model_ids", [[], [7], [7, 8]])
def test_empty_or_single_policy_does_not_crash(model_ids):
    board = leaderboard([], model_ids)
    assert [s.model_id for s in board] == model_ids
    assert all((s.score, s.ci_low, s.ci_high, s.votes) == (1000, 1000, 1000, 0) for s in board)
    assert win_rate_matrix([], model_ids).shape == (len(model_ids), len(model_ids))


def test_policy_without_votes_scores_1000_with_degenerate_interval():
    board = {s.model_id: s for s in leaderboard(synthetic(300), [*STRENGTHS, 99])}
    assert (board[99].score, board[99].ci_low, board[99].ci_high, board[99].votes) == (1000, 1000, 1000, 0)


def test_leaderboard_sorted_with_intervals_around_scores():
    board = leaderboard(synthetic(2000), list(STRENGTHS))
    assert [s.model_id for s in board] == [13, 12, 11, 10]
    for s in board:
        assert s.ci_low < s.score < s.ci_high


def test_intervals_narrow_with_more_data():
    def mean_width(n):
        board = leaderboard(synthetic(n, seed=1), list(STRENGTHS))
        return np.mean([s.ci_high - s.ci_low for s in board])

    small, large = mean_width(400), mean_width(6400)
    # Width shrinks like 1/sqrt(n): 16x the votes should give about a quarter of the width.
    assert large < 0.4 * small


@pytest.mark.parametrize("seat", ["a", "b"])
def test_one_vote_gives_a_wide_interval_that_shrinks_with_3_and_30_votes(seat):
    def board(n):
        winner = {s.model_id: s for s in leaderboard([Comparison(1, 2, seat)] * n, [1, 2])}[1 if seat == "a" else 2]
        return winner

    one, three, thirty = board(1), board(3), board(30)
    for s in (one, three, thirty):
        assert s.ci_low < s.score < s.ci_high
    widths = [s.ci_high - s.ci_low for s in (one, three, thirty)]
    assert widths[0] > widths[1] > widths[2] > 0
    assert widths[0] > 400  # one vote says little: hundreds of points either way
    assert one.ci_low < 1000  # one win does not prove the winner better
    assert one.preliminary and three.preliminary and not thirty.preliminary


def test_preliminary_counts_only_fitted_votes():
    comparisons = [Comparison(1, 2, "a")] * (PRELIMINARY_VOTES - 1) + [Comparison(1, 2, "both_bad")] * 5
    board = leaderboard(comparisons, [1, 2])
    assert all(s.preliminary and s.votes == PRELIMINARY_VOTES + 4 for s in board)
    assert not any(s.preliminary for s in leaderboard(comparisons + [Comparison(2, 1, "tie")], [1, 2]))


def test_intervals_cover_the_true_scores_about_95_percent_of_the_time():
    """The Laplace intervals are calibrated: over many simulated arenas of 200 votes, the
    true (centred) Elo gap of each policy lies inside its interval about 95% of the time."""
    log_strength = np.log(list(STRENGTHS.values()))
    truth = dict(zip(STRENGTHS, 1000 + 400 / math.log(10) * (log_strength - log_strength.mean())))
    hits = [s.ci_low <= truth[s.model_id] <= s.ci_high
            for seed in range(100) for s in leaderboard(synthetic(200, seed=seed), list(STRENGTHS))]
    assert 0.9 <= np.mean(hits) <= 0.99


def test_win_rate_matrix_hand_computed():
    comparisons = [
        Comparison(1, 2, "a"), Comparison(2, 1, "a"), Comparison(1, 2, "a"), Comparison(1, 2, "tie"),
        Comparison(3, 1, "b"), Comparison(1, 3, "both_bad"),
        Comparison(2, 3, "both_bad"),
        Comparison(1, 5, "a"),  # 5 is not listed: ignored
    ]
    matrix = win_rate_matrix(comparisons, [1, 2, 3, 4])
    # 1 vs 2: 1 wins twice, loses once, one tie -> 2.5 / 4.
    expected = np.array([
        [np.nan, 0.625, 1.0, np.nan],
        [0.375, np.nan, np.nan, np.nan],
        [0.0, np.nan, np.nan, np.nan],
        [np.nan, np.nan, np.nan, np.nan],
    ])
    np.testing.assert_array_equal(matrix, expected)


def test_heatmap_annotates_every_measured_cell():
    matrix = np.array([[np.nan, 0.625, 1.0], [0.375, np.nan, np.nan], [0.0, np.nan, np.nan]])
    labels = ["base", "sft-v1", "dpo-v2"]
    fig = heatmap_figure(matrix, labels)
    assert isinstance(fig, Figure)
    heatmap_ax = fig.axes[0]
    assert sorted(t.get_text() for t in heatmap_ax.texts) == ["0.00", "0.38", "0.62", "1.00"]
    assert [t.get_text() for t in heatmap_ax.get_xticklabels()] == labels
    assert [t.get_text() for t in heatmap_ax.get_yticklabels()] == labels
    assert len(fig.axes) == 2  # heatmap and colorbar
    fig.canvas.draw()


def test_heatmap_rejects_mismatched_labels():
    with pytest.raises(ValueError):
        heatmap_figure(np.zeros((2, 2)), ["only one"])


def test_unknown_choice_is_rejected():
    with pytest.raises(ValueError):
        Comparison(1, 2, "draw")
