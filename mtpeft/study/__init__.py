"""Run a study end to end: tune on validation -> choose -> final seeds on test -> tables, statistics, plots.

    python -m mtpeft.study methods_mix3_tuned                  # conf/experiment/methods_mix3_tuned.yaml
    python -m mtpeft.study methods_mix3_tuned trainer.max_steps=600 --launcher basic
    make study STUDY=methods_mix3_tuned ARGS="..."

A study is an experiment config (``conf/experiment/<name>.yaml``: ``hydra.sweeper.params`` with ``method``
and ``seed``). Optional keys read by this runner (and removed from the runs' configs, so changing them
never invalidates a finished job):

``tune`` -- the tuning protocol::

    tune:
      seed: 0                  # the tuning seed (its data and initialisation)
      lr: [1.0e-3, 3.0e-3, 1.0e-2, 3.0e-2]   # the grid of every method: config key -> values (lr = optimizer.lr)
      methods:                 # per method: extra grid keys (added; same key: replaced), or null: not tuned
        hycam: {method.routing: [hard_gumbel, softmax]}
        none: null
      overrides: []            # tuning stage only (e.g. [ablation.variant=default])
      widen: 2                 # grid sampler: values added at most beyond an edge (default 2; 0: never)
      sampler: grid            # grid (default) | optuna
      trials: 20               # optuna: trials per method (default 20)

  Stage 1 sweeps every method over its grid with the tuning seed on the validation split (``test=false``);
  the best combination per method is the one with the highest ``val/avg/score`` (of the best checkpoint),
  ties broken by the smaller value (numbers) or the earlier one in the grid (other values), key by key in
  grid order. Stage 2 runs each method with its chosen values and the study's seeds on test, recording
  them as ``tuned: {key: value}`` in the run's config (so in ``results.json``, the config hash and the
  table's starred ``lr*`` columns). ``experiments/<name>/tuning.{md,csv}`` keeps the whole grid.

  *Widening at the edge* (grid sampler): when a method's best value of a numeric grid key is the lowest or
  highest of that key's grid, the best may lie beyond it, so the runner adds the next value in the grid's
  progression beyond that edge (`mtpeft.study.tuning.next_value`: geometric for positive values spaced by
  ratio, else arithmetic; ``1e-3, 3e-3, 1e-2, 3e-2`` goes on with ``3e-4`` below and ``0.1`` above), runs that
  method's new jobs (the new value crossed with its other keys' values), and chooses again; at most
  ``tune.widen`` times, stopping as soon as every best is interior (the ties rule decides which value is
  best, so a tie with the edge's neighbour is interior). The added jobs are ordinary tuning jobs: the
  declared grid's jobs and hashes are unchanged, a re-run skips every job that finished (widened ones
  included) and widens the same way. ``tuning.csv`` names in ``widened`` the keys whose value lies beyond
  the declared grid; ``tuning.md`` marks such values with ``⁺``.

  *Optuna* (``sampler: optuna``): instead of the grid, a TPE search per method driven from this runner
  with Optuna's ask-and-tell API (``optuna.create_study`` in memory, ``TPESampler(seed=tune.seed)``, so
  methods start from the same random trials where their spaces agree; written against optuna 2.10, the
  version ``hydra-optuna-sweeper`` pins (``sweeps`` extra), using only calls that newer versions keep:
  ``ask``, ``suggest_float/int/categorical``, ``tell``). The search space
  is the same keys: a list is categorical, ``{low: 1.0e-4, high: 1.0e-1, log: true}`` a range (integers
  when both ends are); on the command line
  ``+tune.sampler=optuna '~tune.lr' '+tune.lr={low:1e-4,high:1e-1,log:true}'``. Each trial is an ordinary
  one-job tuning sweep whose ``val/avg/score`` is told back (a failed job: a failed trial). A re-run asks
  the same trials in the same order (the sampler is seeded and sees the same scores), so every finished
  trial is skipped by its job hash and its score replayed into the new search; only the rest run (one
  short process per replayed trial). Trials of one method run one at a time; with the joblib launcher
  ``--n-jobs`` methods search at once. ``widen`` does not apply.

``check`` -- a convergence check after the final stage (`mtpeft.study.check`): the methods at their chosen
values under ``check.overrides`` (a longer budget, e.g. ``[trainer.max_steps=360]``) with ``check.seeds``;
``experiments/<name>/check/`` gets the check's tables and ``ranking.md``, the study's ranking against the
check's (does the order hold at a longer budget?)::

    check: {overrides: [trainer.max_steps=360], seeds: [0], methods: [lora, hycam, mtl_lora]}

``probe`` -- a capacity probe (``probe: {loss_threshold: 0.1}``, e.g. ``conf/experiment/capacity.yaml``
with ``debug=overfit``): after the sweep, ``experiments/<name>/capacity.{md,csv}`` gives per method the
first logged step whose training loss is at or below the threshold (updates done before that loss), the
final and the lowest training loss, from each run's CSV log.

The stages are ordinary ``python -m mtpeft.train -m`` sweeps run as subprocesses (Hydra semantics
unchanged) with ``skip_finished``: re-running the command resumes, redoing only missing and failed jobs.
Each stage writes into its own sweep directories under ``<paths.log_dir>/<task_name>/multiruns/``, and the
tables cover exactly the jobs of this invocation (skipped ones are read from the runs they point to).
Launcher: joblib (``--n-jobs`` parallel jobs, ``cpu_threads=1``) when the plugin is installed, else
Hydra's basic (sequential) one. With joblib, a stage's sweeps also run side by side while their jobs fit in
``--n-jobs`` (`mtpeft.study.sweeps.run_sweeps_in_slots`): a check on one seed or one method's widened value
is a one-job sweep, and two of them share two cores instead of one idling; a sweep gives its slots back
as its last jobs end (a next sweep that needs only the freed slots starts beside the previous one's last
job). The final and check stages then run one sweep per tuned method and seed, and one per seed for the
untuned methods (`mtpeft.study.commands.one_sweep_per_seed`): a sweep keeps the slots it started with, so one
sweep of a method's three seeds on two slots would run its third seed beside an idle slot. The jobs that
finished before (a re-run, a seed added to a study) of a sweep of several jobs (a tuning grid, the untuned
methods) are not counted (`mtpeft.study.unfinished.jobs_to_run` hashes each job as the job itself would):
such a sweep with one job left takes one slot. Other arguments are Hydra overrides given to every job.

Publishing (across sessions and fresh checkouts, where ``logs/`` is empty): after each sweep (and every
`mtpeft.study.publish.PUBLISH_EVERY_S` seconds while one runs) the runner
copies every successful run under ``<paths.log_dir>/<task_name>/`` into
``<paths.published_dir>/<task_name>/runs/<name>/`` (``experiments/<name>/runs/`` by default;
`mtpeft.study.publish.publish`):
``results.json``, the metrics CSV, ``scores.jsonl.gz`` and ``.hydra/{config,overrides}.yaml``, never
checkpoints or wandb files. Names are stable (``tune_lora_lr=0.01_s0_<job hash prefix>``) and a job
already published is not copied again. `mtpeft.train` also looks there for finished jobs, so committing
``experiments/<name>/runs/`` and re-running the command in a new checkout runs only what is missing.
``python -m mtpeft.study <name> --publish`` publishes without running anything (e.g. for a plain
``python -m mtpeft.train experiment=<name>`` sweep); ``--no-publish`` turns the automatic copy off.
``python -m mtpeft.study <name> --status`` says where the study stands (`mtpeft.study.status`).

Stopping: a SIGINT, SIGTERM or SIGHUP to the runner stops every job of its sweeps at the end of its current
step (resumable) and publishes what finished (`mtpeft.study.sweeps`).

Modules: `mtpeft.study.config` (the study's declaration: its config composed, read and validated, the
command line's overrides sorted), `mtpeft.study.commands` (each stage's ``mtpeft.train -m`` commands and
their job counts), `mtpeft.study.tuning` (choosing, widening a grid at an edge, the grid and Optuna
searches), `mtpeft.study.capacity` (the capacity probe's tables), `mtpeft.study.publish` (publishing finished
runs), `mtpeft.study.unfinished` (how many jobs of a sweep will run), `mtpeft.study.runner` (the whole
study), `mtpeft.study.cli` (the command line, run by ``__main__``), `mtpeft.study.check` (the convergence check), `mtpeft.study.stages` (stage names of sweep
directories and runs), `mtpeft.study.status` (``--status``) and `mtpeft.study.sweeps` (sweeps as
subprocesses, stopping them). This package's own module imports none of them: `mtpeft.results.load`
imports `mtpeft.study.stages`, and `mtpeft.study.check` imports `mtpeft.results`.
"""
