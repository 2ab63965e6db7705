//! Guest-visible page and message layouts: reference TSC page, SynIC message and event-flags pages, VP assist page, sparse VP sets.
