"""The benchmarks' PNG plots (matplotlib, Agg). Every number plotted is also in result.json."""

from __future__ import annotations

import sys
from pathlib import Path


def _pyplot():
    """matplotlib.pyplot on the Agg backend, or None (with a note) when not installed."""
    try:
        import matplotlib
    except ImportError:
        print("bench: matplotlib is not installed, so no plots (pip install "
              "'sglang-dflash[bench]'); result.json has every number", file=sys.stderr)
        return None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _concurrency_axis(ax, levels: list[int]) -> None:
    """A log axis labelled at the levels only (no 2x10^0 minor labels between them)."""
    from matplotlib.ticker import NullFormatter, NullLocator

    ax.set_xscale("log")
    ax.xaxis.set_minor_locator(NullLocator())
    ax.xaxis.set_minor_formatter(NullFormatter())
    ax.set_xticks(levels, [str(c) for c in levels])


def write_online_plots(result: dict, out: Path) -> list[str]:
    """tau and tok/s vs concurrency; the accepted-drafts histogram and the per-position
    acceptance curve of each level when the server sent per-request histograms."""
    plt = _pyplot()
    if plt is None:
        return []
    levels = result["levels"]
    cs = [lv["concurrency"] for lv in levels]
    fig, (ax_tau, ax_tps) = plt.subplots(1, 2, figsize=(10, 4))
    ax_tau.plot(cs, [float("nan") if lv["tau"] is None else lv["tau"] for lv in levels], "o-")
    if all(lv["tau"] is None for lv in levels):
        ax_tau.text(0.5, 0.5, "tau n/a: no per-request acceptance stats", ha="center",
                    transform=ax_tau.transAxes)
    ax_tau.set(xlabel="concurrency", ylabel="tau (tokens per verify step)", title="acceptance")
    ax_tps.plot(cs, [lv["output_tok_s"] for lv in levels], "o-", label="server under test")
    if result.get("baseline"):
        ax_tps.plot(cs, [lv["output_tok_s"] for lv in result["baseline"]["levels"]], "s--",
                    label="baseline")
    ax_tps.set(xlabel="concurrency", ylabel="output tok/s", title="throughput")
    ax_tps.legend()
    for ax in (ax_tau, ax_tps):
        _concurrency_axis(ax, cs)
    fig.tight_layout()
    fig.savefig(out / "tau_and_throughput.png", dpi=120)
    plt.close(fig)
    written = ["tau_and_throughput.png"]

    with_hist = [lv for lv in levels if lv["accept_len_histogram"]]
    with_server = [lv for lv in levels if lv.get("server_acceptance")]
    if with_hist or with_server:
        written.append(_position_plot(with_hist, with_server, out / "position_acceptance.png", plt))
    if not with_hist:
        return written
    fig, ax = plt.subplots(figsize=(7, 4))
    width = 0.8 / len(with_hist)
    n_bins = max(len(lv["accept_len_histogram"]) for lv in with_hist)
    for k, lv in enumerate(with_hist):
        h = lv["accept_len_histogram"]
        # bars of the levels side by side, centred on each integer accept length
        offset = (k - (len(with_hist) - 1) / 2) * width
        ax.bar([a + offset for a in range(len(h))], [x / sum(h) for x in h], width,
               label=f"c={lv['concurrency']}")
    ax.set_xticks(range(n_bins))
    ax.set(xlabel="accepted drafts per verify step", ylabel="fraction of verify steps",
           title="accept length histogram")
    ax.legend()
    fig.tight_layout()
    fig.savefig(out / "accept_len_histogram.png", dpi=120)
    plt.close(fig)
    written.insert(1, "accept_len_histogram.png")
    return written


def _position_plot(with_hist: list[dict], with_server: list[dict], path: Path, plt) -> str:
    """P(draft j accepted) per level: solid from the per-request histograms, dashed from
    the server's own counts (/server_info), when it reports them."""
    fig, ax = plt.subplots(figsize=(7, 4))
    curves = [(lv["position_accept_rate"], "o-", f"c={lv['concurrency']} per-request") for lv in with_hist]
    curves += [(lv["server_acceptance"]["position_accept_rate"], "x--", f"c={lv['concurrency']} server counts")
               for lv in with_server]
    for rates, style, label in curves:
        ax.plot(range(1, len(rates) + 1), rates, style, label=label)
    ax.set_xticks(range(1, max(len(r) for r, _, _ in curves) + 1))
    ax.set(xlabel="draft position j", ylabel="P(draft j accepted)", ylim=(0, 1.02),
           title="per-position acceptance")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path.name


def write_offline_plot(result: dict, path: Path) -> None:
    """Per-position acceptance and the commit length histogram of a `bench offline` run."""
    plt = _pyplot()
    if plt is None:
        return
    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 3.5))
    rates = result["position_accept_rate"]
    a.bar(range(1, len(rates) + 1), rates)
    a.set_xticks(range(1, len(rates) + 1))
    a.set(xlabel="draft position j", ylabel="P(accepted)", ylim=(0, 1),
          title=f"per-position acceptance (tau {result['tau']:.2f})")
    counts = result["commit_len_counts"]
    b.bar(range(len(counts)), counts)
    b.set_xticks(range(len(counts)))
    b.set(xlabel="tokens committed per verify step", ylabel="steps", title="commit_len histogram")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def write_verify_width_plot(result: dict, path: Path) -> bool:
    """tau by verify width W for 'draft L, verify W' and 'draft W, verify W', and the
    per-position acceptance of each; False when matplotlib is missing."""
    plt = _pyplot()
    if plt is None:
        return False
    rows = result["verify_widths"]
    L = rows[-1]["draft_trained_block"]["block_size"]
    widths = [r["verify_width"] for r in rows]
    fig, (ax_tau, ax_full, ax_shrunk) = plt.subplots(1, 3, figsize=(15, 4))
    ax_tau.plot(widths, [r["draft_trained_block"]["tau"] for r in rows], "o-", label=f"draft {L}, verify W")
    ax_tau.plot(widths, [r["draft_shrunk_block"]["tau"] for r in rows], "s--", label="draft W, verify W")
    ax_tau.set_xticks(widths)
    ax_tau.set(xlabel="verify width W", ylabel="tau (tokens per verify step)",
               title=f"teacher-forced tau (tau at W = {L}: {rows[-1]['draft_trained_block']['tau']:.2f})")
    ax_tau.legend()
    # at most 6 curves per panel, spread over the widths (every number is in result.json)
    shown = rows if len(rows) <= 6 else [rows[round(i * (len(rows) - 1) / 5)] for i in range(6)]
    for ax, key, title in ((ax_full, "draft_trained_block", f"draft {L}, verify W"),
                           (ax_shrunk, "draft_shrunk_block", "draft W, verify W")):
        for r in shown:
            rates = r[key]["position_accept_rate"]
            ax.plot(range(1, len(rates) + 1), rates, "o-", markersize=3, label=f"W={r['verify_width']}")
        ax.set_xticks(range(1, L))
        ax.set(xlabel="draft position j", ylabel="P(draft j accepted)", ylim=(0, 1.02),
               title=f"per-position acceptance, {title}")
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return True
