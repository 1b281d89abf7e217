"""Reading runs back: held-out evaluation, run folders, comparisons and plots."""
