//! Nothing here: see tests/.
