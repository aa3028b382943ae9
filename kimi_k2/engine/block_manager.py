"""Page pool of the latent cache: block tables, reference counts and hash-chained prefix caching with LRU eviction.

A full page is identified by hash(parent page hash, its page_size token ids), so equal hashes mean equal prefixes
(token ids are compared too, against collisions). Pages nobody references keep their latents and hash: they are
reused on a prefix hit and evicted least-recently-freed first, after the pages that hold nothing reusable.
"""

from __future__ import annotations

from collections import OrderedDict, deque

from kimi_k2.engine.sequence import Sequence


class Page:
    __slots__ = ("id", "ref_count", "hash", "token_ids")

    def __init__(self, page_id: int):
        self.id = page_id
        self.ref_count = 0
        self.hash: int | None = None
        self.token_ids: tuple[int, ...] = ()


class BlockManager:
    def __init__(self, num_pages: int, page_size: int, enable_prefix_caching: bool = True):
        self.page_size = page_size
        self.enable_prefix_caching = enable_prefix_caching
        self.pages = [Page(i) for i in range(num_pages)]
        self.free_ids: deque[int] = deque(range(num_pages))  # unreferenced, nothing cached
        self.evictable: OrderedDict[int, None] = OrderedDict()  # unreferenced but hashed, oldest first
        self.hash_to_page: dict[int, int] = {}
        self.prefix_queried_tokens = 0
        self.prefix_hit_tokens = 0

    @property
    def num_pages(self) -> int:
        return len(self.pages)

    @property
    def num_free_pages(self) -> int:
        return len(self.free_ids) + len(self.evictable)

    @property
    def num_used_pages(self) -> int:
        return self.num_pages - self.num_free_pages

    @property
    def hit_rate(self) -> float:
        return self.prefix_hit_tokens / self.prefix_queried_tokens if self.prefix_queried_tokens else 0.0

    @staticmethod
    def chain_hash(parent: int | None, token_ids: tuple[int, ...]) -> int:
        return hash((parent, token_ids))

    def pages_needed(self, num_tokens: int) -> int:
        return -(-num_tokens // self.page_size)

    def match_prefix(self, seq: Sequence) -> None:
        """Admit `seq` with the longest run of cached full pages of its tokens; one token is always left to compute."""
        assert not seq.block_table and seq.num_computed_tokens == 0
        if not self.enable_prefix_caching:
            return
        parent = None
        usable = (len(seq) - 1) // self.page_size
        for i in range(usable):
            tokens = tuple(seq.token_ids[i * self.page_size:(i + 1) * self.page_size])
            h = self.chain_hash(parent, tokens)
            page_id = self.hash_to_page.get(h)
            if page_id is None or self.pages[page_id].token_ids != tokens:
                break
            self._ref(page_id)
            seq.block_table.append(page_id)
            seq.page_hashes.append(h)
            parent = h
        seq.num_hashed_pages = len(seq.block_table)
        seq.num_computed_tokens = len(seq.block_table) * self.page_size

    def record_admission(self, seq: Sequence) -> None:
        """Count `seq`'s prefix hit once it is admitted (hit rate = prompt tokens served from cache / prompt tokens)."""
        seq.num_cached_prompt_tokens = min(seq.num_computed_tokens, seq.num_prompt_tokens)
        self.prefix_queried_tokens += seq.num_prompt_tokens
        self.prefix_hit_tokens += seq.num_cached_prompt_tokens

    def can_grow(self, seq: Sequence, num_new_tokens: int) -> bool:
        return self.pages_needed(seq.num_computed_tokens + num_new_tokens) - len(seq.block_table) <= \
            self.num_free_pages

    def grow(self, seq: Sequence, num_new_tokens: int) -> None:
        """Give `seq` pages for `num_new_tokens` more latents; call `can_grow` first."""
        for _ in range(self.pages_needed(seq.num_computed_tokens + num_new_tokens) - len(seq.block_table)):
            seq.block_table.append(self._take())

    def commit(self, seq: Sequence) -> None:
        """Register the pages `seq` has filled since the last call, so later requests can share them."""
        if not self.enable_prefix_caching:
            return
        num_full = seq.num_computed_tokens // self.page_size
        for i in range(seq.num_hashed_pages, num_full):
            tokens = tuple(seq.token_ids[i * self.page_size:(i + 1) * self.page_size])
            h = self.chain_hash(seq.page_hashes[-1] if seq.page_hashes else None, tokens)
            page = self.pages[seq.block_table[i]]
            if h not in self.hash_to_page:  # an equal page may already be cached; this one then stays private
                page.hash, page.token_ids = h, tokens
                self.hash_to_page[h] = page.id
            seq.page_hashes.append(h)
        seq.num_hashed_pages = max(seq.num_hashed_pages, num_full)

    def free(self, seq: Sequence) -> None:
        """Drop `seq`'s references; its tail pages become the first candidates for eviction."""
        for page_id in reversed(seq.block_table):
            page = self.pages[page_id]
            page.ref_count -= 1
            if page.ref_count == 0:
                if page.hash is None:
                    self.free_ids.append(page_id)
                else:
                    self.evictable[page_id] = None
        seq.block_table.clear()
        seq.page_hashes.clear()
        seq.num_hashed_pages = 0
        seq.num_computed_tokens = 0

    def _ref(self, page_id: int) -> None:
        page = self.pages[page_id]
        if page.ref_count == 0:
            self.evictable.pop(page_id)
        page.ref_count += 1

    def _take(self) -> int:
        if self.free_ids:
            page_id = self.free_ids.popleft()
        else:
            page_id, _ = self.evictable.popitem(last=False)
            page = self.pages[page_id]
            del self.hash_to_page[page.hash]
            page.hash, page.token_ids = None, ()
        self.pages[page_id].ref_count = 1
        return page_id
