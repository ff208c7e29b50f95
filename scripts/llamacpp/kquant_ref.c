// Known-answer bytes from ggml's own reference quantizers, for the tests of qlora-rt's
// models/src/formats/gguf/quant/. Reads rows of 256 f32 values from argv[1]; for each type writes what
// `quantize_row_<type>_ref` (ggml-quants.c: the functions llama-quantize runs without an importance matrix)
// makes of them to argv[2].<type>. Built and run by kquant_ref.py against a llama.cpp checkout's libggml-base.
#include <stdio.h>
#include <stdlib.h>
#include "ggml.h"
#include "ggml-quants.h"

typedef void (*quant_fn)(const float *, void *, int64_t);

int main(int argc, char ** argv) {
    if (argc != 3) {
        fprintf(stderr, "usage: %s INPUT.f32 OUT_PREFIX\n", argv[0]);
        return 2;
    }
    FILE * f = fopen(argv[1], "rb");
    if (!f) { perror(argv[1]); return 1; }
    fseek(f, 0, SEEK_END);
    long n = ftell(f) / (long) sizeof(float);
    fseek(f, 0, SEEK_SET);
    float * x = malloc(n * sizeof(float));
    if (fread(x, sizeof(float), n, f) != (size_t) n) { perror("read"); return 1; }
    fclose(f);
    struct { const char * name; enum ggml_type type; quant_fn fn; } types[] = {
        {"Q8_0", GGML_TYPE_Q8_0, (quant_fn) quantize_row_q8_0_ref},
        {"Q4_0", GGML_TYPE_Q4_0, (quant_fn) quantize_row_q4_0_ref},
        {"Q4_1", GGML_TYPE_Q4_1, (quant_fn) quantize_row_q4_1_ref},
        {"Q5_0", GGML_TYPE_Q5_0, (quant_fn) quantize_row_q5_0_ref},
        {"Q5_1", GGML_TYPE_Q5_1, (quant_fn) quantize_row_q5_1_ref},
        {"Q4_K", GGML_TYPE_Q4_K, (quant_fn) quantize_row_q4_K_ref},
        {"Q5_K", GGML_TYPE_Q5_K, (quant_fn) quantize_row_q5_K_ref},
        {"Q6_K", GGML_TYPE_Q6_K, (quant_fn) quantize_row_q6_K_ref},
    };
    for (size_t i = 0; i < sizeof(types) / sizeof(types[0]); i++) {
        size_t bytes = ggml_row_size(types[i].type, n);
        void * out = calloc(1, bytes);
        types[i].fn(x, out, n);
        char path[4096];
        snprintf(path, sizeof(path), "%s.%s", argv[2], types[i].name);
        FILE * o = fopen(path, "wb");
        if (!o || fwrite(out, 1, bytes, o) != bytes) { perror(path); return 1; }
        fclose(o);
        free(out);
    }
    free(x);
    return 0;
}
