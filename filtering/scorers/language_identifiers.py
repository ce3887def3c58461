"""Language identifiers: which caption is in which language, by one of four backends
(py3langid, lingua, fastText's lid.176.bin, gcld3), with a fallback chain. The
``language_id`` scorer writes their codes and confidences as columns; the ``language``
filter (:mod:`filtering.filters.language`, where the backends and DataComp's use of them
are described) thresholds those columns, or classifies the rows that reach it when used
on its own."""

from __future__ import annotations

import functools
import hashlib
import os
from typing import Any, ClassVar, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from filtering.errors import ConfigError, InputError

BACKENDS = ("py3langid", "lingua", "fasttext", "gcld3")
Backend = Literal["py3langid", "lingua", "fasttext", "gcld3"]

# fastText's lid.176.bin and its sha256 as DataComp's baselines/utils.py (download("fasttext"))
# fetches and checks it (131,266,198 bytes).
LID176_SHA256 = "7e69ec5451bc261cc7844e49e4792a85d7f09c06789ec800fc4a44aec362764e"
LID176_URL = "https://dl.fbaipublicfiles.com/fasttext/supervised-models/lid.176.bin"
LID176_URL_ENV = "POOLSIFT_LID176_URL"  # the default model_url (a mirror; tests point it at loopback)
# Whose baseline each identifier reproduces, for the run's log line.
BASELINE_OF = {
    "fasttext": "DataComp's identifier (basic_filter, text_based, image_based)",
    "gcld3": "DataComp's identifier for its laion2b baseline",
}


class IdentifierUnavailableError(Exception):
    """Marks the errors a ``fallback:`` may step over: package or model file missing.
    ``reason`` is the short form for the run's log line."""

    def __init__(self, message: str, reason: str):
        super().__init__(message)
        self.reason = reason


class MissingPackageError(IdentifierUnavailableError, ConfigError):
    pass


class MissingModelError(IdentifierUnavailableError, InputError):
    pass


class ModelDownloadError(IdentifierUnavailableError, InputError):
    """No model file and no network to fetch it: a ``fallback:`` may step over it. (A
    download whose checksum is wrong is :class:`~filtering.models.download.ChecksumError`,
    which no fallback hides.)"""


class IdentifierParams(BaseModel):
    """Which identifier classifies which text column: the settings the ``language_id``
    scorer and the ``language`` filter share (frozen, unknown keys rejected, no NaN: the
    filters' :class:`~filtering.filters.base.Params` rules)."""

    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)

    path_fields: ClassVar[tuple[str, ...]] = ("model_path",)  # local paths: resolved against the config's folder
    backend: Backend = "py3langid"
    fallback: list[Backend] | None = Field(default=None, min_length=1)  # used in order when backend is unavailable
    model_path: str | None = None  # fasttext: the model file (~ expanded); None: lid.176.bin in the user cache
    model_url: str | None = (
        None  # fasttext: where a missing model is downloaded from; None: $POOLSIFT_LID176_URL or LID176_URL
    )
    model_sha256: str | None = None  # fasttext: the downloaded file's sha256; None: lid.176.bin's
    candidates: list[str] | None = Field(default=None, min_length=2)  # None: every language the model knows
    field: str | None = None  # text column; default caption

    @field_validator("candidates")
    @classmethod
    def _candidate_codes(cls, value: list[str] | None) -> list[str] | None:
        return language_codes(value)

    @field_validator("model_sha256")
    @classmethod
    def _sha256(cls, value: str | None) -> str | None:
        if value is not None and not (len(value) == 64 and all(c in "0123456789abcdef" for c in value.lower())):
            raise ValueError("must be 64 hex digits (a sha256)")
        return value.lower() if value else value

    @classmethod
    def path_may_be_missing(cls, params: dict[str, Any], field: str) -> bool:
        """A missing fastText model is downloaded by the run (or, failing that, a
        ``fallback:`` runs): not an error before the run."""
        return field == "model_path"

    def fasttext_model(self) -> str:
        """The fastText model file: ``model_path`` (``~`` expanded), or ``lid.176.bin`` in
        the user cache folder."""
        if self.model_path:
            return os.path.expanduser(self.model_path)
        from filtering.models.download import user_cache_dir

        return str(user_cache_dir() / "lid.176.bin")

    def fasttext_url(self) -> str:
        return self.model_url or os.environ.get(LID176_URL_ENV) or LID176_URL

    @field_validator("fallback", mode="before")
    @classmethod
    def _one_or_list(cls, value: Any) -> Any:
        return [value] if isinstance(value, str) else value

    @property
    def chain(self) -> list[str]:
        """The identifiers to try, in order."""
        return [self.backend, *(self.fallback or [])]

    @model_validator(mode="after")
    def _model_path(self) -> IdentifierParams:
        chain = self.chain
        if len(set(chain)) != len(chain):
            raise ValueError(f"fallback repeats an identifier: {', '.join(chain)}")
        if "fasttext" not in chain:
            for key in ("model_path", "model_url", "model_sha256"):
                if getattr(self, key) is not None:
                    raise ValueError(f"{key} is only used by backend fasttext, not {self.backend}")
        if "gcld3" in chain and self.candidates is not None:
            raise ValueError("candidates: gcld3 cannot be restricted to candidate languages")
        return self


def language_codes(value: list[str] | None) -> list[str] | None:
    if value is None:
        return None
    out = []
    for code in value:
        code = str(code).strip().lower()
        if not (2 <= len(code) <= 3 and code.isascii() and code.isalpha()):
            raise ValueError(f"{code!r} is not an ISO 639-1 language code such as en, de, fr")
        out.append(code)
    return out


# --- identifiers: predict(texts) -> (codes, confidences) ------------------------------


class _Py3Langid:
    def __init__(self, candidates: tuple[str, ...] | None = None):
        from py3langid.langid import MODEL_FILE, LanguageIdentifier

        self.ident = LanguageIdentifier.from_model_file(MODEL_FILE, norm_probs=True)
        if candidates:
            unknown = sorted(set(candidates) - set(self.ident.nb_classes))
            if unknown:
                known = ", ".join(sorted(set(self.ident.nb_classes)))
                raise ConfigError(f"language.candidates: py3langid does not know {unknown}; it knows {known}")
            self.ident.set_languages(list(candidates))

    def predict(self, texts: list[str]) -> tuple[list[str], np.ndarray]:
        out = [self.ident.classify(t) for t in texts]
        return [c for c, _ in out], np.array([p for _, p in out], dtype=np.float64)


class _Lingua:
    def __init__(self, candidates: tuple[str, ...] | None = None):
        try:
            import lingua
        except ImportError as e:
            raise MissingPackageError(
                "language.backend lingua needs lingua-language-detector: pip install 'poolsift[lingua]'",
                "lingua is not installed: pip install lingua-language-detector",
            ) from e
        builder = lingua.LanguageDetectorBuilder
        if candidates:
            try:
                codes = [getattr(lingua.IsoCode639_1, c.upper()) for c in candidates]
            except AttributeError as e:
                raise ConfigError(f"language.candidates: lingua does not know {e.name!r}") from e
            self.detector = builder.from_iso_codes_639_1(*codes).build()
        else:
            self.detector = builder.from_all_languages().build()

    def predict(self, texts: list[str]) -> tuple[list[str], np.ndarray]:
        codes, conf = [], np.zeros(len(texts), dtype=np.float64)
        for i, values in enumerate(self.detector.compute_language_confidence_values_in_parallel(texts)):
            if values and values[0].value > 0:
                codes.append(values[0].language.iso_code_639_1.name.lower())
                conf[i] = values[0].value
            else:
                codes.append("und")
        return codes, conf


class _FastText:
    """DataComp's identifier: ``model.predict([t.replace("\\n", " ") ...], k=1)``."""

    def __init__(self, model_path: str, candidates: tuple[str, ...] | None = None):
        self.candidates = candidates
        try:
            import fasttext
        except ImportError as e:
            raise MissingPackageError(
                "language.backend fasttext needs the fasttext package: pip install 'poolsift[fasttext]' "
                "(or pip install fasttext-community)",
                "fasttext is not installed: pip install fasttext-community",
            ) from e
        if not os.path.isfile(model_path):
            raise MissingModelError(
                f"language.model_path: no fastText model at {model_path!r} (lid.176.bin: {LID176_URL})",
                f"no fastText model at {model_path!r}",
            )
        if hasattr(fasttext, "FastText"):  # its load-time warning on stderr, silenced as DataComp does
            fasttext.FastText.eprint = lambda *args: None
        self.model = fasttext.load_model(model_path)

    def predict(self, texts: list[str]) -> tuple[list[str], np.ndarray]:
        lines = [t.replace("\n", " ") for t in texts]
        k = 1 if self.candidates is None else -1  # with candidates: the whole ranking
        try:
            labels, probs = self.model.predict(lines, k=k)
            ranked = [list(zip(p, lab, strict=True)) for lab, p in zip(labels, probs, strict=True)]
        except ValueError:
            # fasttext 0.9.2's predict breaks under numpy 2 (np.array(copy=False)); the
            # binding underneath returns the same (probability, label) pairs, given the
            # line ending that predict appends (it is a token: "</s>").
            ranked = [self.model.f.predict(line + "\n", k, 0.0, "strict") for line in lines]
        codes, conf = [], np.zeros(len(lines), dtype=np.float64)
        for i, pairs in enumerate(ranked):
            best = [(p, lab.removeprefix("__label__")) for p, lab in pairs]
            if self.candidates is not None:
                best = [(p, c) for p, c in best if c in self.candidates]
            codes.append(best[0][1] if best else "und")
            conf[i] = float(best[0][0]) if best else 0.0
        return codes, conf


class _Gcld3:
    """DataComp's LAION-2B identifier (``apply_filter.py`` 51-52, 318-320)."""

    def __init__(self):
        try:
            import gcld3
        except ImportError as e:
            raise MissingPackageError(
                "language.backend gcld3 needs the gcld3 package: it builds from source with protobuf's compiler "
                "and headers (Debian: apt-get install protobuf-compiler libprotobuf-dev; then pip install gcld3)",
                "gcld3 is not installed: apt-get install protobuf-compiler libprotobuf-dev, then pip install gcld3",
            ) from e
        self.ident = gcld3.NNetLanguageIdentifier(min_num_bytes=0, max_num_bytes=1000)

    def predict(self, texts: list[str]) -> tuple[list[str], np.ndarray]:
        out = [self.ident.FindLanguage(text=t.replace("\n", " ")) for t in texts]
        return [r.language for r in out], np.array([r.probability for r in out], dtype=np.float64)


@functools.lru_cache(maxsize=4)
def identifier(backend: str, model_path: str | None = None, candidates: tuple[str, ...] | None = None):
    """The identifier for ``backend``, loaded once per process."""
    if backend == "py3langid":
        return _Py3Langid(candidates)
    if backend == "lingua":
        return _Lingua(candidates)
    if backend == "fasttext":
        return _FastText(model_path, candidates)
    if backend == "gcld3":
        return _Gcld3()
    raise ConfigError(f"language.backend: unknown {backend!r}; choose one of {', '.join(BACKENDS)}")


@functools.lru_cache(maxsize=8)
def _file_sha256(path: str, size: int, mtime_ns: int) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()


def _describe(backend: str, model_path: str | None) -> tuple[str, dict[str, Any]]:
    """How the log line names an identifier that loaded, and what the manifest records."""
    if backend == "fasttext":
        st = os.stat(model_path)
        digest = _file_sha256(model_path, st.st_size, st.st_mtime_ns)
        lid176 = digest == LID176_SHA256
        what = "lid.176.bin" if lid176 else "a fastText model that is not lid.176.bin (sha256 differs)"
        return f"fasttext ({what}, {model_path})", {"model_path": model_path, "model_sha256": digest, "lid176": lid176}
    if backend == "gcld3":
        return "gcld3 (NNetLanguageIdentifier, min_num_bytes=0, max_num_bytes=1000)", {}
    return backend, {}


def fetch_fasttext_model(params: IdentifierParams, path: str, progress: bool = True) -> None:
    """Download the fastText model to ``path`` if it is not there (DataComp's
    ``download("fasttext", "~/.cache/fasttext")``), with a progress bar, kept only when its
    sha256 is the expected one. Without the fasttext package nothing is fetched (the
    identifier then says the package is missing)."""
    if os.path.isfile(path):
        return
    try:
        import fasttext  # noqa: F401
    except ImportError:
        return
    from filtering.models.download import DownloadError, fetch

    url = params.fasttext_url()
    try:
        fetch(url, path, params.model_sha256 or LID176_SHA256, what="language", progress=progress)
    except DownloadError as e:
        raise ModelDownloadError(str(e), f"could not download {url} to {path}") from e


def resolve(params: IdentifierParams, progress: bool = True) -> dict[str, Any]:
    """Load the first available identifier of ``params.chain`` (downloading a missing
    fastText model, with a progress bar unless ``progress`` is false); the record says which
    ran, why the ones before it did not, and carries the run's one log line (``note``).
    Without a usable identifier, the first one's error is raised."""
    model_path = params.fasttext_model() if "fasttext" in params.chain else None
    candidates = tuple(sorted(params.candidates)) if params.candidates else None
    skipped: list[tuple[str, str]] = []
    errors: list[IdentifierUnavailableError] = []
    for backend in params.chain:
        try:
            if backend == "fasttext":
                fetch_fasttext_model(params, model_path, progress)
            identifier(backend, model_path, candidates)
        except IdentifierUnavailableError as e:
            skipped.append((backend, e.reason))
            errors.append(e)
            continue
        name, extra = _describe(backend, model_path)
        wanted = params.backend
        record: dict[str, Any] = {"requested": wanted, "backend": backend, **extra}
        if skipped:
            reasons = "; ".join(why for _, why in skipped)
            record["unavailable"] = dict(skipped)
            note = f"language: ran {name} instead of {wanted} ({reasons})"
            if wanted in BASELINE_OF:
                note += f": the kept set is NOT what {BASELINE_OF[wanted]} gives"
            if "fasttext" in dict(skipped) and "no fastText model" in dict(skipped)["fasttext"]:
                note += f"; lid.176.bin: {params.fasttext_url()}"
        else:
            note = f"language: ran {name}"
            if backend in BASELINE_OF and extra.get("lid176", True):
                note += f", {BASELINE_OF[backend]}"
        record["note"] = note
        return record
    if isinstance(errors[0], ModelDownloadError) and len(params.chain) == 1:  # offline: name the way on
        raise ModelDownloadError(
            f"{errors[0]}, or let the language entry fall back: --set 'filters[N].language.fallback=py3langid' "
            "(N: its index; then the kept set is not DataComp's)",
            errors[0].reason,
        ) from errors[0]
    raise errors[0]


# Below this many distinct captions, worker start-up costs more than it saves.
PARALLEL_MIN_TEXTS = 50_000


def predict_texts(
    texts: list[str],
    backend: str,
    model_path: str | None = None,
    candidates: tuple[str, ...] | None = None,
    workers: int | None = None,
    min_parallel: int = PARALLEL_MIN_TEXTS,
) -> tuple[list[str], np.ndarray]:
    """``identifier(...).predict(texts)``, split over worker processes for large inputs.

    py3langid and fastText classify one caption at a time (py3langid: about 7,000
    captions/s per core on a 2-core VM), so a pool's millions of captions are cut into
    chunks and classified on every core: 1.8x on two cores. Each caption's result does
    not depend on the others, so the output is the same. lingua parallelises by itself.
    """
    from filtering.tasks import process_pool, worker_count

    workers = worker_count(workers)
    if backend == "lingua" or workers < 2 or len(texts) < max(min_parallel, 2):
        return identifier(backend, model_path, candidates).predict(texts)
    identifier(backend, model_path, candidates)  # configuration errors surface here, once
    step = -(-len(texts) // (4 * workers))
    chunks = [texts[i : i + step] for i in range(0, len(texts), step)]
    codes: list[str] = []
    confs = []
    with process_pool(workers) as executor:
        for c, p in executor.map(_predict_chunk, [(backend, model_path, candidates, chunk) for chunk in chunks]):
            codes += c
            confs.append(p)
    return codes, np.concatenate(confs)


def _predict_chunk(args) -> tuple[list[str], np.ndarray]:
    backend, model_path, candidates, texts = args
    return identifier(backend, model_path, candidates).predict(texts)
