"""Captions as comma-separated tags, processed as kohya sd-scripts does: the first `keep` tags stay in place, the others
are shuffled (`shuffle`) and each dropped with probability `dropout`, every draw from the item's own random source."""

import random
from dataclasses import dataclass


@dataclass(frozen=True)
class TagOptions:
    """kohya's --shuffle_caption, --keep_tokens and --caption_tag_dropout_rate."""

    shuffle: bool = False
    keep: int = 0
    dropout: float = 0.0

    @property
    def active(self) -> bool:
        """Whether captions change from draw to draw (keep alone moves nothing)."""
        return self.shuffle or self.dropout > 0

    def apply(self, caption: str, rng: random.Random) -> str:
        """`caption` with its tags after the kept ones shuffled, then dropped, joined with ", " as kohya joins them.
        Empty tags (a trailing comma) are left out, so no ", ," appears wherever they would land."""
        tags = [tag.strip() for tag in caption.split(",") if tag.strip()]
        kept, rest = tags[:self.keep], tags[self.keep:]
        if self.shuffle:
            rng.shuffle(rest)
        if self.dropout > 0:
            rest = [tag for tag in rest if rng.random() >= self.dropout]
        return ", ".join(kept + rest)
