"""Reports: history tables, time-to-accuracy and plots, computed from run files."""
