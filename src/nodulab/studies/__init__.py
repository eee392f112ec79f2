"""The grid: study files, one run at a time or on an executor, resumable, into the results store."""
