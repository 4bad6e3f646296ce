import random

import pytest

from olmo_hybrid.data.corpus import Document
from olmo_hybrid.data.prepare import prepare

WORDS = ("thou art the sun and moon of night day king queen love death sword crown blood fair foul "
         "heaven earth speak hear lord lady good ill wherefore hence anon prithee alas").split()


def random_documents(n: int, seed: int, min_words: int = 20, max_words: int = 400) -> list[Document]:
    """Documents of random words with punctuation and newlines; windows of them are distinct w.h.p."""
    rng = random.Random(seed)
    docs = []
    for i in range(n):
        words = [rng.choice(WORDS) + rng.choice(["", "", ",", ".", "!\n", "\n"]) for _ in
                 range(rng.randint(min_words, max_words))]
        docs.append(Document(" ".join(words), f"doc{i}"))
    return docs


@pytest.fixture(scope="session")
def small_docs() -> list[Document]:
    return random_documents(60, seed=1)


@pytest.fixture(scope="session")
def small_dataset(tmp_path_factory, small_docs):
    """60 random documents, a 300-id BPE, 10% validation documents."""
    out = tmp_path_factory.mktemp("data") / "small"
    return prepare(None, out, documents=small_docs, bpe_vocab=300, val_fraction=0.1, workers=1, progress=False)
