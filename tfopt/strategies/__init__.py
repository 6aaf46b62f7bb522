"""Distribution-strategy wrappers (filled by the strategies issue)."""
