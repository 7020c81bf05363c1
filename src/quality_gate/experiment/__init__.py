"""The experiment runner: when does selection pay, at equal fine-tune compute?

One command runs the whole pipeline and compares selectors (``quality-gate experiment``, ``make demo``)::

    pool (synthetic, with labelled corruptions of both kinds, or your files)
      -> convert the selector -> Stage 1 warmup -> Stage 2 (+ IFD, embeddings) [-> Stage 2, unwarmed gates]
      -> selection per arm (quality_gate, perplexity, ifd, random) at k, plus selection-only ablations
         (quality_gate on unwarmed gates, quality_gate without perplexity weighting: alpha=0)
      -> Stage 3 per arm x fine-tune seed, every arm (full data included) at the same compute
      -> Stage 4 per arm x seed (+ the base model)
      -> summary.json / summary.md / summary.html (and the Markdown to ``results_file``, e.g. docs/results/)

Statistics: every arm is fine-tuned with each seed of ``seeds``, paired with random's run of the same
seed. The difference of an arm to random (held-out loss, exact match) gets a bootstrap interval that
resamples seeds and held-out samples together (paired: the same resample for both arms); "better" or
"worse" is only claimed when the interval excludes 0.

Compute: ``compute.match=steps`` gives every fine-tuned arm the optimizer steps a k-selection needs
for ``compute.epochs`` epochs (the full-data arm too, so it sees each sample fewer times);
``tokens`` matches trained tokens instead (counted as Stage 3 encodes the samples: its chat template,
``max_sequence_length`` and ``truncation``); ``epochs`` is the old sample-count budget. The summary
states each arm's steps, trained tokens and estimated FLOPs, and the wall time and FLOPs of Stages
1-2 (the selection's own bill).

A sweep (``sweep.noise_rates``, ``sweep.budgets``; ``make sweep``) repeats this over a grid, runs
Stages 1-2 once per noise rate, and plots the held-out metrics against the noise rate per selector
with random's interval as a band.

The package: :mod:`.runner` (orchestration: runs the stages through their typed configs),
:mod:`.statistics` (paired bootstrap intervals, verdicts, what each selection kept) and :mod:`.render`
(the Markdown and HTML summaries, their figures).
"""

from quality_gate.experiment.runner import cell_fingerprint, run, run_experiment, run_sweep

__all__ = ["cell_fingerprint", "run", "run_experiment", "run_sweep"]
