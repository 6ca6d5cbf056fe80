// Whether the cores are shared: the signal the parallel passes use to size their team.
#pragma once

namespace gradkern {

// True when the calling thread, over its recent past, spent more than a third as long waiting
// for a core as running on one: other runnable threads (DataLoader workers, a second job, a
// tokenizer) outnumber the cores. A parallel pass then risks waiting a whole scheduler slice
// (milliseconds) for a helper thread that is not running, which a small pass cannot earn back.
//
// Read from the kernel's per-thread scheduler statistics (Linux /proc/thread-self/schedstat:
// run time and run-queue wait), a read of about 1 us made at most once per window. A verdict
// covers at least 4 ms of the thread's runnable time since the previous verdict; until that
// much has passed the previous verdict stands. Where the statistics are unavailable (another OS, a kernel without
// CONFIG_SCHED_INFO), it is always false, and passes run as on a quiet machine.
bool cpu_shared();

// Whether cpu_shared() can see anything on this host (for `gradkern info`).
bool cpu_share_measurable();

}  // namespace gradkern
