/* OpenMPI between two ranks (tools/apps-bench.py, tests/tests/matrix.rs):
 * rank 0 <-> rank 1, 1 B ping-pong (half round trip, us), then 1 MiB
 * messages from rank 0 to rank 1 with an acknowledgement every 16
 * (MB/s). Each 1 MiB message carries a fixed pattern with its number
 * stamped at both ends: the receiver checks the stamps of every message
 * and every byte of every 16th, received into a buffer overwritten first
 * (a check of each would bound the rate). The 1 B messages carry a
 * counter, checked both ways.
 * Prints "LAT1B_US x BW1MIB_MBS y" from rank 0 (the second of two
 * passes; the first warms up). Exit status 1 on a wrong byte. */
#include <mpi.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

static unsigned char at(size_t i) {
    return (unsigned char)(i * 31 + (i >> 12));
}

static void stamp(unsigned char *b, size_t n, int k) {
    for (int j = 0; j < 4; j++) {
        b[j] = (unsigned char)(k >> (8 * j));
        b[n - 4 + j] = (unsigned char)(k >> (8 * j));
    }
}

/* Whether b is message k: its stamps, and with all, every other byte. */
static int check(const unsigned char *b, size_t n, int k, int all) {
    for (int j = 0; j < 4; j++)
        if (b[j] != (unsigned char)(k >> (8 * j)) || b[n - 4 + j] != (unsigned char)(k >> (8 * j)))
            return 0;
    for (size_t i = 4; all && i < n - 4; i++)
        if (b[i] != at(i))
            return 0;
    return 1;
}

int main(int argc, char **argv) {
    int rank;
    MPI_Init(&argc, &argv);
    MPI_Comm_rank(MPI_COMM_WORLD, &rank);
    const int n1 = 20000, nb = 400;
    const size_t big = 1 << 20;
    unsigned char *buf = malloc(big);
    for (size_t i = 0; i < big; i++)
        buf[i] = at(i);
    char b1 = 0;
    int bad = 0;
    for (int pass = 0; pass < 2; pass++) {
        MPI_Barrier(MPI_COMM_WORLD);
        double t = MPI_Wtime();
        for (int i = 0; i < n1; i++) {
            char want = (char)(i * 7 + pass);
            if (rank == 0) {
                b1 = want;
                MPI_Send(&b1, 1, MPI_CHAR, 1, 0, MPI_COMM_WORLD);
                MPI_Recv(&b1, 1, MPI_CHAR, 1, 0, MPI_COMM_WORLD, MPI_STATUS_IGNORE);
            } else {
                MPI_Recv(&b1, 1, MPI_CHAR, 0, 0, MPI_COMM_WORLD, MPI_STATUS_IGNORE);
                MPI_Send(&b1, 1, MPI_CHAR, 0, 0, MPI_COMM_WORLD);
            }
            bad |= b1 != want;
        }
        double lat = (MPI_Wtime() - t) / n1 / 2 * 1e6;
        MPI_Barrier(MPI_COMM_WORLD);
        t = MPI_Wtime();
        for (int i = 0; i < nb; i++) {
            if (rank == 0) {
                stamp(buf, big, pass * nb + i);
                MPI_Send(buf, (int)big, MPI_CHAR, 1, 1, MPI_COMM_WORLD);
            } else {
                if (i % 16 == 0)
                    memset(buf, 0xA5, big);
                MPI_Recv(buf, (int)big, MPI_CHAR, 0, 1, MPI_COMM_WORLD, MPI_STATUS_IGNORE);
                bad |= !check(buf, big, pass * nb + i, i % 16 == 0);
            }
            if (i % 16 == 15) {
                if (rank == 0)
                    MPI_Recv(&b1, 1, MPI_CHAR, 1, 2, MPI_COMM_WORLD, MPI_STATUS_IGNORE);
                else
                    MPI_Send(&b1, 1, MPI_CHAR, 0, 2, MPI_COMM_WORLD);
            }
        }
        if (rank == 0)
            MPI_Recv(&b1, 1, MPI_CHAR, 1, 3, MPI_COMM_WORLD, MPI_STATUS_IGNORE);
        else
            MPI_Send(&b1, 1, MPI_CHAR, 0, 3, MPI_COMM_WORLD);
        double bw = nb * (double)big / (MPI_Wtime() - t) / 1e6;
        if (rank == 0 && pass == 1)
            printf("LAT1B_US %.2f BW1MIB_MBS %.0f\n", lat, bw);
    }
    int any = 0;
    MPI_Allreduce(&bad, &any, 1, MPI_INT, MPI_LOR, MPI_COMM_WORLD);
    if (bad)
        fprintf(stderr, "rank %d received a wrong byte\n", rank);
    MPI_Finalize();
    free(buf);
    return any ? 1 : 0;
}
