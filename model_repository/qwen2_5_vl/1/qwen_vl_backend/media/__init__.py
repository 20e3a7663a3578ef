"""Media elements of a request (images, videos) decoded into the frames the processor takes."""
