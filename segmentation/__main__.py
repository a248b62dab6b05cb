"""`python -m segmentation --host 0.0.0.0 --port 7070`: serve the trained segmentation backend."""

from backends.server.cli import main
from segmentation.model import SegmentationBackend

if __name__ == "__main__":
    main(SegmentationBackend, default_port=7070)
