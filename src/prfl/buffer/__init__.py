"""Per-client latest-model buffer: the server's store for PR-FL's asynchronous aggregation.

Slot i holds client i's latest flat model W_i, its mask m_i over the prunable prefix (None =
dense), its sample count n_i, the server round n'_i at which it was sent and the round a_i at
which it arrived. Staleness is either re-aged at every aggregation or frozen on arrival:

    reaged: s_i = staleness_weight(kind, n - n'_i) at round n      frozen: s_i = staleness_weight(kind, a_i - n'_i)
    p_i = s_i / sum_j s_j,   MaskFedAvg with coefficients c_i = p_i n_i   (prfl.aggregation.mask_fedavg)

With ``frozen=`` a :class:`~prfl.aggregation.Staleness`, the buffer also keeps MaskFedAvg's
running sums (:mod:`prfl.incremental`): :meth:`ClientBuffer.put` subtracts the client's old
contribution c_i = s_i n_i and adds the new one, and :meth:`ClientBuffer.aggregate_running`
returns the aggregate in O(N) whatever the number of buffered clients. The sums are recomputed
exactly from the slots every K arrivals and at every :meth:`ClientBuffer.state_dict` (a checkpoint);
a loaded buffer recomputes them, so a resumed run continues from the same sums bit for bit.

or, with ``robust=``, a robust rule over the buffer that respects the masks (prfl.robust):
norm clipping of W_i - W_prev, coordinate-wise trimmed mean (weighted by c_i) or median.

Storage:

- ``"dense"``: each slot keeps the full fp32 vector (4 |W| bytes) and a bool mask (N bytes).
  With ``path`` the vectors live in one memory-mapped file of num_clients x total fp32 instead
  of RAM (the buffer's only I/O; the file is created or overwritten, zero-filled).
- ``"sparse"``: each slot keeps the values at its mask (ascending positions) then the suffix,
  and the mask as a :class:`~prfl.distribution.PackedIndex` (bitmap or int32 positions, the
  cheaper). Lossless because a masked client's weights are exactly zero outside its mask;
  :meth:`ClientBuffer.put` checks this and refuses weights that are not.
- ``"prefix"``: for masks that are prefixes of a ranking (PR-FL's: the first ceil(rho N) weights
  of the current importance order), :meth:`ClientBuffer.put` takes the ranking's ``order`` too.
  A slot keeps only its values in ranking order and the suffix; the mask is (ranking, count), and
  each distinct ranking is held once for all the slots that use it. MaskFedAvg then works per
  ranking in rank space: the kept values of every slot of that ranking are added into one
  accumulator over their prefix (contiguous, no index), the mask weights M form a step function
  (sum of c_i over the slots whose count exceeds the rank: one cumulative sum), and one scatter
  per ranking brings both back to weight positions. An aggregation costs sum_i |m_i| + (rankings
  x N) instead of (clients x N): what lets a buffer of 1,000 sparse clients aggregate at every
  update. Summation order differs from :func:`~prfl.aggregation.mask_fedavg` (equal up to
  rounding, not bit for bit). ``order`` may be a prefix of the ranking (at least as long as the
  slot's count): rankings whose held prefixes agree are one ranking, and :meth:`ClientBuffer.compact_orders`
  cuts every held ranking to the longest prefix its slots use (after a new ranking, the old ones
  are needed only as far as the densities of the slots still holding them).
  With ``path`` (a directory) the slot values live in a file there instead of RAM
  (:class:`SlotArena`): each slot a page-aligned region mapped on its own, whose pages are handed
  back to the kernel as soon as an aggregation has read them, so the server's resident memory does
  not grow with the fleet (the values stay in the page cache, which the kernel may evict).

Parts (:class:`ClientBuffer` is composed of mixins that work on its state):

- :mod:`prfl.buffer.client_buffer`: :class:`ClientBuffer` itself: construction, :meth:`~ClientBuffer.put`
  and :meth:`~ClientBuffer.remove` (with the running sums' bookkeeping of a slot's contribution);
- :mod:`prfl.buffer.slots`: slot storage (:class:`~prfl.buffer.slots.SlotStore`): building and
  installing slots, the held rankings and masks, reading a slot back;
- :mod:`prfl.buffer.arena`: :class:`SlotArena`, the file behind a file-backed prefix buffer;
- :mod:`prfl.buffer.aggregate`: the full aggregation over the slots (re-aged or frozen staleness,
  the robust rules, the plain average);
- :mod:`prfl.buffer.running`: the aggregation from the running sums (frozen staleness) and their
  exact recomputation;
- :mod:`prfl.buffer.checkpoint`: :meth:`~ClientBuffer.state_dict` and :meth:`~ClientBuffer.load_state_dict`.
"""

from prfl.buffer.aggregate import STALENESS_MODES
from prfl.buffer.arena import SlotArena
from prfl.buffer.client_buffer import ClientBuffer
from prfl.buffer.slots import STORAGE_KINDS, BufferEntry, order_dtype

__all__ = ["STALENESS_MODES", "STORAGE_KINDS", "BufferEntry", "ClientBuffer", "SlotArena", "order_dtype"]
