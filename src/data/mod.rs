//! Training data: dataset formats, chat and prompt masking, packing, splits.
