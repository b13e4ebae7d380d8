"""Reward functions: the built-ins, resolving ``--reward`` names, the contract check, and the recording wrapper.

A reward function has TRL's signature: ``fn(prompts, completions, completion_ids, **columns) -> list[float]``;
every dataset column arrives as a keyword (``answer`` is the reference answer), plus ``trainer_state``,
``log_extra`` and ``log_metric``. ``None`` means "does not apply to this completion" (TRL turns it into NaN and
leaves it out of that component's mean).

Names resolve in this order: a callable given as an object (``$fn``, ``rl(rewards=[fn])``); ``judge`` and
``reward-model@<ref>`` (built by the stage); an import path ``module:function``; a callable of that name in the
notebook's namespace (the IPython kernel's ``user_ns``, so a papermill run finds the notebook's functions;
``__main__`` in a script); a built-in. A detached run (``--detach``) resolves its rewards in a worker process,
where the notebook's namespace does not exist: :func:`portable` turns each item into a name that process can
resolve (a built-in, ``judge``, ``reward-model@<ref>`` or ``module:function``), or refuses a function that only
the notebook defines.

Sampled completions are not public in TRL 1.16 (only the private ``trainer._logs``), so :class:`RewardSet` wraps
every function: it checks each call's result, and after the last component of a batch it records per completion
the prompt, the completion, every component, the weighted total and the advantage (recomputed the way the trainer
computes it, from the same rewards) for the dashboard and the run's ``samples.jsonl``.
"""

from __future__ import annotations

import math
import re
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any

from llmops_jupyter.core.errors import ConfigError, StageError

ANSWER_TAG = re.compile(r"<answer>\s*(.*?)\s*</answer>", re.DOTALL)
NUMBER = re.compile(r"-?\d+(?:\.\d+)?")
#: The format a ``format`` reward looks for: an answer tag (``<answer>…</answer>``), anywhere in the completion.
FORMAT_PATTERN = r"<answer>.*?</answer>"


def reward_name(obj: Any) -> str:
    """What the registry, the dashboard and TRL's metric names call a reward: a string as given, a callable by its
    ``__name__`` (a ``functools.partial`` by its function's)."""
    if isinstance(obj, str):
        return obj
    name = getattr(obj, "__name__", None) or getattr(getattr(obj, "func", None), "__name__", None)
    return str(name or type(obj).__name__)


def _text(c: Any) -> str:
    """A completion as text: TRL passes strings, or message lists for conversational datasets."""
    if isinstance(c, list) and c and isinstance(c[-1], dict):
        return str(c[-1].get("content", ""))
    return str(c)


def extract_answer(text: str) -> str:
    """The tagged answer (``<answer>…</answer>``) if any, else the whole completion, stripped."""
    m = ANSWER_TAG.search(text)
    return (m.group(1) if m else text).strip()


def _refs(answer: Any, n: int) -> list[str]:
    if answer is None:
        raise StageError("Reward needs the reference answer ('answer' column) but the dataset has none.",
                         fix="use a dataset whose examples end with an assistant answer")
    return [str(a) for a in answer] if isinstance(answer, (list, tuple)) else [str(answer)] * n


# -- built-ins -------------------------------------------------------------------------------------------------------
def exact(completions: list, answer: Any = None, **_: Any) -> list[float]:
    """1.0 when the (tagged, else whole) answer equals the reference answer exactly (whitespace-stripped)."""
    refs = _refs(answer, len(completions))
    return [float(extract_answer(_text(c)) == extract_answer(r)) for c, r in zip(completions, refs)]


def numeric(completions: list, answer: Any = None, **_: Any) -> list[float]:
    """1.0 when the last number of the (tagged, else whole) answer equals the reference's last number."""
    refs = _refs(answer, len(completions))
    out = []
    for c, r in zip(completions, refs):
        got, want = NUMBER.findall(extract_answer(_text(c))), NUMBER.findall(r)
        out.append(float(bool(got and want) and math.isclose(float(got[-1]), float(want[-1]), abs_tol=1e-6)))
    return out


def make_format(pattern: str = FORMAT_PATTERN) -> Callable[..., list[float]]:
    rx = re.compile(pattern, re.DOTALL)

    def format(completions: list, **_: Any) -> list[float]:  # noqa: A001 - the reward's public name
        """1.0 when the completion contains the format pattern (default: an <answer>…</answer> tag)."""
        return [float(bool(rx.search(_text(c)))) for c in completions]

    return format


def make_overlong(max_length: int, soft: int | None = None) -> Callable[..., list[float]]:
    """DAPO's soft overlong punishment: 0 up to ``max_length - soft`` tokens, then linearly down to -1 at the cap."""
    soft = soft if soft is not None else max(1, max_length // 4)

    def overlong(completions: list, completion_ids: list | None = None, **_: Any) -> list[float]:
        """0 for completions well under the length cap, falling linearly to -1 at it (DAPO soft punishment)."""
        lengths = [len(ids) for ids in completion_ids] if completion_ids is not None else [
            len(_text(c).split()) for c in completions]
        start = max_length - soft
        return [0.0 if n <= start else -min(1.0, (n - start) / soft) for n in lengths]

    return overlong


def repetition(completions: list, completion_ids: list | None = None, n: int = 3, **_: Any) -> list[float]:
    """Minus the share of repeated n-grams (n=3 tokens): 0 for no repetition, towards -1 for a loop."""
    out = []
    for i, c in enumerate(completions):
        toks = list(completion_ids[i]) if completion_ids is not None else _text(c).split()
        grams = [tuple(toks[j:j + n]) for j in range(max(0, len(toks) - n + 1))]
        out.append(-(1 - len(set(grams)) / len(grams)) if grams else 0.0)
    return out


BUILTINS = ("exact", "numeric", "format", "overlong", "repetition")


def builtin(name: str, cfg: Any) -> Callable[..., list[float]]:
    if name == "exact":
        return exact
    if name == "numeric":
        return numeric
    if name == "format":
        return make_format(getattr(cfg, "format_pattern", FORMAT_PATTERN))
    if name == "overlong":
        return make_overlong(cfg.max_completion_length)
    if name == "repetition":
        return repetition
    raise KeyError(name)


# -- resolving names -------------------------------------------------------------------------------------------------
def notebook_namespace() -> dict[str, Any]:
    """The namespace a name given on the command line refers to: the IPython kernel's (a notebook, papermill), else
    ``__main__``'s (a script)."""
    ipython = sys.modules.get("IPython")
    if ipython is not None:
        shell = ipython.get_ipython()
        if shell is not None:
            return shell.user_ns
    main = sys.modules.get("__main__")
    return vars(main) if main is not None else {}


def resolve(ref: Any, cfg: Any, *, namespace: dict[str, Any] | None = None,
            factories: dict[str, Callable[[str], Callable]] | None = None) -> tuple[str, Callable]:
    """``(name, callable)`` for one ``--reward`` item (see the module docstring for the order)."""
    if callable(ref):
        return reward_name(ref), ref
    name = str(ref)
    for prefix, factory in (factories or {}).items():
        if name == prefix or name.startswith(prefix + "@"):
            return name, factory(name)
    if ":" in name:
        return import_reward(name)
    ns = notebook_namespace() if namespace is None else namespace
    if name in ns and callable(ns[name]) and not isinstance(ns[name], type):
        return name, ns[name]
    if name in BUILTINS:
        return name, builtin(name, cfg)
    if name in ns:
        raise ConfigError(f"rl: --reward {name} names a {type(ns[name]).__name__}, not a function.",
                          field="reward", value=name, fix=f"define `def {name}(completions, **kw): ...` in the notebook")
    import difflib

    close = difflib.get_close_matches(name, [*BUILTINS, *(k for k, v in ns.items() if callable(v)
                                                          and not k.startswith("_"))], n=1)
    hint = f"did you mean '{close[0]}'? " if close else ""
    raise ConfigError(f"rl: --reward {name} is not a notebook function or a built-in reward.", field="reward",
                      value=name, fix=f"{hint}define it in a cell above, pass $fn or module:function, or use a "
                                      f"built-in: {', '.join(BUILTINS)}, judge, reward-model@<ref>")


def import_reward(path: str) -> tuple[str, Callable]:
    """``module:function`` (``module:Class.method`` too) → ``(function name, callable)``; the module is imported
    from the process's path (a ``.py`` file beside the notebook is on it: the kernel's and a worker's working
    directory)."""
    import importlib

    module, _, attr = path.partition(":")
    if not module or not attr:
        raise ConfigError(f"rl: --reward {path} is not an import path module:function.", field="reward", value=path,
                          fix="write it as module:function, e.g. my_rewards:correct")
    try:
        obj: Any = importlib.import_module(module)
    except ImportError as exc:
        raise ConfigError(f"rl: --reward {path}: cannot import module '{module}' ({type(exc).__name__}: {exc}).",
                          field="reward", value=path,
                          fix=f"put {module.replace('.', '/')}.py beside the notebook or on PYTHONPATH") from None
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise ConfigError(f"rl: --reward {path}: module '{module}' has no '{attr}'.", field="reward", value=path,
                              fix=f"define `def {attr.split('.')[-1]}(completions, **kw): ...` in {module}")
        obj = getattr(obj, part)
    if not callable(obj) or isinstance(obj, type):
        raise ConfigError(f"rl: --reward {path} is a {type(obj).__name__}, not a function.", field="reward",
                          value=path, fix="point it at a function `fn(completions, **kw) -> list[float]`")
    return attr.split(".")[-1], obj


def _import_path(fn: Any) -> str | None:
    """``module:qualname`` when another process importing it gets this same object, else None."""
    import importlib

    module, qual = getattr(fn, "__module__", None), getattr(fn, "__qualname__", None)
    if not module or not qual or module == "__main__" or "<" in qual:
        return None
    try:
        obj: Any = importlib.import_module(module)
        for part in qual.split("."):
            obj = getattr(obj, part)
    except (ImportError, AttributeError):
        return None
    return f"{module}:{qual}" if obj is fn else None


def portable(ref: Any, cfg: Any, *, namespace: dict[str, Any] | None = None, flag: str = "--reward") -> str:
    """A ``--reward`` item as a name a worker process resolves to the same function (``--detach``); a function
    defined only in the notebook (``__main__``, or inside a function) is refused in one line naming it and the fix."""
    if isinstance(ref, str):
        name = ref
        if name in ("judge", "reward-model") or name.startswith("reward-model@") or ":" in name:
            if ":" in name and not name.startswith("reward-model@"):
                import_reward(name)  # a typo fails here, in the cell, not in the worker's log
            return name
        ns = notebook_namespace() if namespace is None else namespace
        if name in ns and callable(ns[name]) and not isinstance(ns[name], type):
            fn = ns[name]
        elif name in BUILTINS:
            return name
        else:
            return resolve(name, cfg, namespace=ns)[0]  # raises its one-line error (did you mean ...)
    else:
        fn, name = ref, reward_name(ref)
    path = _import_path(fn)
    if path is None:
        where = getattr(fn, "__module__", None) or "?"
        raise ConfigError(f"rl: {flag} {name} is defined in the notebook ({where}), and a --detach worker process "
                          "cannot import it.", field="reward" if flag == "--reward" else "check_reward", value=name,
                          fix=f"move `{name}` to a module beside the notebook (e.g. my_rewards.py) and pass "
                              f"{flag} my_rewards:{name}, or drop --detach")
    return path


# -- checking one call ----------------------------------------------------------------------------------------------
def check_output(name: str, out: Any, n: int) -> tuple[list[float], str | None]:
    """Rewards as floats (None → NaN) and the first problem, in one line naming the function, or None."""
    if isinstance(out, (str, bytes)) or not isinstance(out, Sequence) and not hasattr(out, "tolist"):
        return [], f"reward '{name}' returned {type(out).__name__}, not a list of {n} numbers"
    values = list(out.tolist() if hasattr(out, "tolist") else out)
    if len(values) != n:
        return [], f"reward '{name}' returned {len(values)} value(s) for {n} completions (one per completion)"
    clean = []
    for i, v in enumerate(values):
        if v is None:
            clean.append(math.nan)
            continue
        if isinstance(v, bool) or not isinstance(v, (int, float)) and not hasattr(v, "__float__"):
            return [], f"reward '{name}' returned {v!r} ({type(v).__name__}) at index {i}, not a number"
        f = float(v)
        if math.isnan(f) or math.isinf(f):
            return [], (f"reward '{name}' returned {f} at index {i} (return None for 'does not apply', else a "
                        "finite number)")
        clean.append(f)
    return clean, None


def contract_check(rewards: list[tuple[str, Callable]], prompts: list[str], completions: list[str],
                   completion_ids: list[list[int]], columns: dict[str, list], *, timeout_s: float) -> list[str]:
    """Call each reward once on the sampled completions; one line per broken function (empty: all good)."""
    problems = []
    n = len(completions)
    for name, fn in rewards:
        t0 = time.perf_counter()
        try:
            out = fn(prompts=prompts, completions=completions, completion_ids=completion_ids, **columns,
                     trainer_state=None, log_extra=lambda *a, **k: None, log_metric=lambda *a, **k: None)
        except Exception as exc:  # noqa: BLE001 - reported as one line naming the function
            first = str(exc).splitlines()[0] if str(exc) else ""
            problems.append(f"reward '{name}' raised {type(exc).__name__}" + (f": {first}" if first else "")
                            + f" (called on {n} sampled completions)")
            continue
        took = time.perf_counter() - t0
        _, problem = check_output(name, out, n)
        if problem:
            problems.append(problem)
        elif took > timeout_s:
            problems.append(f"reward '{name}' took {took:.1f} s for {n} completions (over --reward-timeout-s "
                            f"{timeout_s:g}); make it faster or cache it")
    return problems


# -- the recording wrapper -------------------------------------------------------------------------------------------
def advantages(totals: list[float], groups: int, method: str, scale: str) -> list[float]:
    """Advantages as the trainer computes them from the same totals: GRPO (sum then normalise per group: minus the
    group mean, over the group/batch std unless ``scale='none'``) or RLOO (minus the mean of the other samples)."""
    import statistics

    g = max(1, len(totals) // max(1, groups))
    out: list[float] = []
    batch_std = statistics.stdev(totals) if len(totals) > 1 else 0.0
    for i in range(0, len(totals), g):
        grp = totals[i:i + g]
        mean = sum(grp) / len(grp)
        if method == "rloo":
            out += [(x - (sum(grp) - x) / (len(grp) - 1)) if len(grp) > 1 else 0.0 for x in grp]
            continue
        std = statistics.stdev(grp) if len(grp) > 1 else 0.0
        div = {"group": std, "batch": batch_std}.get(scale)
        out += [(x - mean) / (div + 1e-4) if div is not None else x - mean for x in grp]
    return out


class RewardSet:
    """The run's reward functions, each wrapped for TRL (named, checked) and for the completions table."""

    def __init__(self, funcs: list[tuple[str, Callable]], weights: list[float], *, num_generations: int,
                 method: str = "grpo", scale_rewards: str = "group"):
        names = [n for n, _ in funcs]
        dupes = {n for n in names if names.count(n) > 1}
        if dupes:
            raise ConfigError(f"rl: reward {sorted(dupes)[0]!r} is given twice.", field="reward",
                              fix="give each reward once (use --reward-weights to weight it)")
        self.funcs = funcs
        self.names = names
        self.weights = weights or [1.0] * len(funcs)
        self.num_generations = num_generations
        self.method, self.scale = method, scale_rewards
        self._batch: dict[str, list[float]] = {}
        self.samples: list[dict[str, Any]] = []  # recorded since the last drain
        self.calls = 0

    def wrapped(self) -> list[Callable]:
        return [self._wrap(i, name, fn) for i, (name, fn) in enumerate(self.funcs)]

    def _wrap(self, index: int, name: str, fn: Callable) -> Callable:
        def reward(prompts, completions, completion_ids=None, **kw):
            out = fn(prompts=prompts, completions=completions, completion_ids=completion_ids, **kw)
            values, problem = check_output(name, out, len(completions))
            if problem:
                raise StageError(problem + f" at training step {getattr(kw.get('trainer_state'), 'global_step', '?')}.",
                                 fix=f"fix '{name}' (the contract check only sees a few completions)")
            self._batch[name] = values
            if index == len(self.funcs) - 1:
                self._record(prompts, completions, kw)
            return values

        reward.__name__ = re.sub(r"[^\w.@-]", "_", name)  # TRL logs rewards/<__name__>/mean
        reward.__qualname__ = reward.__name__
        return reward

    def _record(self, prompts: list, completions: list, kw: dict[str, Any]) -> None:
        n = len(completions)
        comps = {name: self._batch.get(name, [math.nan] * n) for name in self.names}
        totals = [sum(w * v for w, v in zip(self.weights, (comps[nm][i] for nm in self.names)) if not math.isnan(v))
                  for i in range(n)]
        adv = advantages(totals, n // self.num_generations, self.method, self.scale)
        state = kw.get("trainer_state")
        step = int(getattr(state, "global_step", 0) or 0) + 1  # the step these completions train
        answers = kw.get("answer")
        for i in range(n):
            self.samples.append({"step": step, "group": i // self.num_generations, "prompt": _text(prompts[i]),
                                 "completion": _text(completions[i]),
                                 "answer": answers[i] if isinstance(answers, list) else None,
                                 "rewards": {nm: comps[nm][i] for nm in self.names}, "total": totals[i],
                                 "advantage": adv[i]})
        self._batch = {}
        self.calls += 1

    def drain(self) -> list[dict[str, Any]]:
        out, self.samples = self.samples, []
        return out
