"""Labels out: Web Annotations (W3C and Europeana profiles) written as JSON-LD files."""
