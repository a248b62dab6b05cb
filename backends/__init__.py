"""The core shared by the SAM and segmentation backends: protocol server, label config,
image access, brush RLE, coordinates, polygons and auth."""
