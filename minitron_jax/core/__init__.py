"""Shared pieces every room uses: errors, atomic outputs, the lock, progress, the allocator, assets."""
