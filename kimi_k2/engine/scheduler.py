"""Continuous batching: each step gives every running sequence its next tokens, then admits waiting ones.

One step is a token budget (max_num_batched_tokens) shared by decode tokens (1 per sequence) and prefill chunks
(a long prompt is prefilled over several steps). When the page pool runs dry, the most recently admitted
sequence is preempted: its pages are freed and it waits at the front of the queue to be recomputed.
"""

from __future__ import annotations

from collections import deque

from kimi_k2.engine.block_manager import BlockManager
from kimi_k2.engine.sequence import Sequence, SequenceStatus


class Scheduler:
    def __init__(self, block_manager: BlockManager, max_num_seqs: int, max_num_batched_tokens: int):
        self.block_manager = block_manager
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.num_preemptions = 0

    def add(self, seq: Sequence) -> None:
        self.waiting.append(seq)

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    def schedule(self) -> list[tuple[Sequence, int]]:
        """(sequence, number of tokens to compute this step) for every sequence in this step's batch."""
        bm, budget = self.block_manager, self.max_num_batched_tokens
        scheduled: list[tuple[Sequence, int]] = []
        i = 0
        while i < len(self.running) and budget > 0:
            seq = self.running[i]
            n = min(seq.num_uncomputed_tokens, budget)
            while not bm.can_grow(seq, n):
                victim = self.running.pop()
                self._preempt(victim)
                if victim is seq:
                    break
            else:
                bm.grow(seq, n)
                scheduled.append((seq, n))
                budget -= n
                i += 1
        while self.waiting and budget > 0 and len(self.running) < self.max_num_seqs:
            seq = self.waiting[0]
            if bm.enable_prefix_caching and seq.prompt_pending:
                break  # wait for sample 0's prompt pages instead of computing the same prompt again
            bm.match_prefix(seq)
            n = min(seq.num_uncomputed_tokens, budget)
            if not bm.can_grow(seq, n):
                bm.free(seq)
                break
            bm.grow(seq, n)
            bm.record_admission(seq)
            self.waiting.popleft()
            seq.status = SequenceStatus.RUNNING
            self.running.append(seq)
            scheduled.append((seq, n))
            budget -= n
        return scheduled

    def finish(self, seq: Sequence, reason: str) -> None:
        seq.status, seq.finish_reason = SequenceStatus.FINISHED, reason
        self.block_manager.free(seq)
        if seq in self.running:
            self.running.remove(seq)
        elif seq in self.waiting:
            self.waiting.remove(seq)

    def _preempt(self, seq: Sequence) -> None:
        self.block_manager.free(seq)
        seq.status = SequenceStatus.WAITING
        self.waiting.appendleft(seq)
        self.num_preemptions += 1
