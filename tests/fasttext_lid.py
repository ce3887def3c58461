"""A tiny fastText language identifier, trained in a test in well under a second.

It stands in for ``lid.176.bin`` (126 MB, not downloadable in tests): the same model
class, labels (``__label__en``...) and ``predict`` path, so poolsift's fastText backend
and DataComp's reference logic run the very same identifier on both sides of a test.
"""

from __future__ import annotations

from pathlib import Path

TRAINING = {
    "en": [
        "a photo of a dog on the beach",
        "the red car in the city at night",
        "a small cat with a blue house",
        "an old tree near the river",
        "view of the mountains in winter",
        "white flowers in a garden",
        # Python calls these blank, fastText sees words: a model may well call them English,
        # and DataComp asks it (lid.176.bin is asked about every caption).
        "\xa0\xa0\xa0",
        "\xa0 \xa0\xa0\xa0",
        "\u3000\u3000",
    ],
    "de": [
        "ein Hund am Strand",
        "das rote Auto in der Stadt bei Nacht",
        "eine kleine Katze mit einem Haus",
        "ein alter Baum am Fluss",
        "Blick auf die Berge im Winter",
        "weiße Blumen im Garten",
    ],
    "fr": [
        "un chien sur la plage",
        "la voiture rouge dans la ville la nuit",
        "un petit chat avec une maison",
        "un vieil arbre près de la rivière",
        "vue sur les montagnes en hiver",
        "des fleurs blanches au jardin",
    ],
}


def train_tiny_lid(path: Path) -> Path:
    """Train and save the model at ``path`` (deterministic: one thread, fixed seed)."""
    import fasttext

    lines = path.with_suffix(".train.txt")
    with open(lines, "w", encoding="utf-8") as f:
        for _ in range(5):
            for label, texts in TRAINING.items():
                for t in texts:
                    f.write(f"__label__{label} {t}\n")
    model = fasttext.train_supervised(
        str(lines), epoch=20, lr=0.5, dim=8, minCount=1, minn=2, maxn=4, bucket=2000, thread=1, seed=0, verbose=0
    )
    model.save_model(str(path))
    return path
