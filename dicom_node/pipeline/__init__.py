"""One image through restoration: the worker loop and the restoration of one mammogram."""
